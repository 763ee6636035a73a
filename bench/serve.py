"""Serving benchmark: `edgellm serve` beside llama-cpp-python's server (`python -m llama_cpp.server`) on the same
model and threads, in the same run.

    python -m edgellm.bench.serve [MODEL] [--threads N] [--clients 1,2,4,8] [--tokens 128] [--rounds 3]
                                  [--turns 10] [--conversations 3] [--json]

For each server (started as a subprocess on 127.0.0.1, warmed up with one discarded request):
- 1, 2, 4 and 8 concurrent clients, each streaming one chat completion of `--tokens` tokens (end-of-generation
  tokens banned with `logit_bias`, so every answer has exactly that many): aggregate tok/s (all tokens over the
  wall time of the round), per-client decode tok/s, time to first token p50 / p95, and the server's peak RSS. The
  levels run in `--rounds` rounds, interleaved (1, 2, 4, 8, 1, 2, 4, 8, ...), so that a drift of a shared machine
  reaches every level alike; the table holds each level's median round, and the 8 / 1 goal the median of the
  rounds' own ratios (each round's 8 clients over its single stream, measured seconds apart);
- 10-turn conversations (each turn re-sends the whole conversation with one more user message; three of them, each
  opening with its own first message, so none reuses another's turns): the time to first token of every turn, the
  median over the conversations (one TTFT of ~20 ms moves by 10 ms on a shared 2-core machine), and how many of the
  prompt's tokens it ran (the rest came from the server's cache).
The goals of issue 16 are printed at the end: aggregate decode at 8 clients >= 3x edgellm's single stream and
>= 2x llama-cpp-python's server at 8 clients; turn 10's TTFT <= 1.5x turn 1's.

Clients are plain threads with http.client (no client library in the measurement). Timing on a shared machine
moves: compare the servers of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.client import HTTPConnection

QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
             "Describe a walk through a forest in autumn.", "Tell me about the history of bread.",
             "Write a letter to a friend about a trip to the sea.", "Explain why the sky is blue.",
             "Describe a busy market in the morning.", "Write a poem about the moon and the tides."]
TURNS = ["Hi! Can you tell me about cats?", "What do they eat?", "How long do they sleep?", "Are they good pets?",
         "What about dogs?", "Which is easier to care for?", "How about fish?", "What do fish need?",
         "Thanks. Which pet would you pick?", "Why?"]
OPENINGS = ["", "Good morning!", "Hello there."]  # conversation k's first message starts with OPENINGS[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM, Linux) in MiB; its current RSS elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - best effort
        return None


class ServerProcess:
    """A server subprocess on a free port; stopped (terminate, then kill) on exit."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str):
        self.name, self.port = name, port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with code {self.proc.returncode} (see {self.log.name})")
            try:
                conn = HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not come up in {timeout:.0f} s (see {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@dataclass
class StreamResult:
    t_start: float
    t_first: float | None = None
    t_end: float = 0.0
    tokens: int = 0            # from usage when the server sends it, else content chunks
    prompt_tokens: int | None = None   # from usage, when sent
    cached_tokens: int | None = None   # of them, reused from the server's cache (usage.prompt_tokens_details)
    text: str = ""
    error: str | None = None


def stream_chat(port: int, messages: list, max_tokens: int, ban: dict | None, model: str) -> StreamResult:
    """One streamed chat completion, timed on the client."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ban:
        body["logit_bias"] = ban
    res = StreamResult(time.perf_counter())
    chunks = 0
    try:
        conn = HTTPConnection("127.0.0.1", port, timeout=3600)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            res.error = f"HTTP {r.status}: {r.read()[:300]!r}"
            return res
        usage = None
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if res.t_first is None:
                        res.t_first = time.perf_counter()
                    chunks += 1
                    res.text += piece
        conn.close()
        res.tokens = usage["completion_tokens"] if usage else chunks
        if usage:
            res.prompt_tokens = usage.get("prompt_tokens")
            res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except (OSError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    res.t_end = time.perf_counter()
    return res


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Row:
    server: str
    clients: int
    tokens: int
    aggregate_tps: float
    decode_tps_per_client: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    wall_s: float
    peak_rss_mb: float | None
    errors: int = 0
    rounds_tps: list | None = None  # the aggregate tok/s of each round (aggregate_tps: their median)
    ttfts_ms: list | None = None    # every client's TTFT over the rounds (the percentiles' samples)


def merge_rounds(rows: list[Row]) -> Row:
    """One level's rounds -> one row: the median round's aggregate and per-client decode, TTFT percentiles over all
    the rounds' clients, the peak RSS after its first round (the process's peak so far: later rounds come after
    the higher levels)."""
    ttfts = [t for r in rows for t in r.ttfts_ms]
    tps = [r.aggregate_tps for r in rows]
    return Row(rows[0].server, rows[0].clients, sum(r.tokens for r in rows), statistics.median(tps),
               statistics.median(r.decode_tps_per_client for r in rows), percentile(ttfts, 0.5),
               percentile(ttfts, 0.95), sum(r.wall_s for r in rows), rows[0].peak_rss_mb, sum(r.errors for r in rows),
               tps, ttfts)


def concurrency_round(srv: ServerProcess, clients: int, tokens: int, ban: dict, model: str, rep: int = 0) -> Row:
    """One round: `clients` concurrent streams (questions rotated by `rep`) -> its row."""
    ttfts, decode, total_tokens, errors = [], [], 0, 0
    results: list[StreamResult | None] = [None] * clients

    def one(i):
        q = QUESTIONS[(i + rep) % len(QUESTIONS)]
        results[i] = stream_chat(srv.port, [{"role": "user", "content": q}], tokens, ban, model)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for r in results:
        if r.error or r.t_first is None:
            errors += 1
            continue
        total_tokens += r.tokens
        ttfts.append(r.t_first - r.t_start)
        if r.tokens > 1 and r.t_end > r.t_first:
            decode.append((r.tokens - 1) / (r.t_end - r.t_first))
    agg = total_tokens / wall if wall else 0.0
    return Row(srv.name, clients, total_tokens, agg, sum(decode) / len(decode) if decode else 0.0,
               1000 * percentile(ttfts, 0.5), 1000 * percentile(ttfts, 0.95), wall, peak_rss_mb(srv.proc.pid), errors,
               [agg], [1000 * t for t in ttfts])


@dataclass
class Turn:
    ttft_ms: float
    prompt_tokens: int | None   # the whole conversation so far, as the server counted it
    cached_tokens: int | None   # of them, reused from its cache: the turn ran prompt - cached tokens
    all_ms: list | None = None  # the turn's TTFT in each conversation (ttft_ms: their median)


def conversation(srv: ServerProcess, turns: int, max_tokens: int, model: str, k: int = 0) -> list[Turn]:
    """Each turn of conversation k (its first message is its own) re-sent with one more user message each time: its
    TTFT and prompt tokens."""
    messages, out = [], []
    for i in range(turns):
        text = TURNS[i % len(TURNS)]
        opening = OPENINGS[k % len(OPENINGS)] if i == 0 else ""
        messages.append({"role": "user", "content": f"{opening} {text}" if opening else text})
        r = stream_chat(srv.port, messages, max_tokens, None, model)
        if r.error or r.t_first is None:
            raise RuntimeError(f"{srv.name}: conversation turn {i + 1} failed: {r.error or 'no text'}")
        out.append(Turn(1000 * (r.t_first - r.t_start), r.prompt_tokens, r.cached_tokens))
        messages.append({"role": "assistant", "content": r.text})
    return out


def conversations(srv: ServerProcess, n: int, turns: int, max_tokens: int, model: str) -> list[Turn]:
    """n conversations; per turn the median TTFT (prompt and cached tokens of the first conversation) and
    every conversation's TTFT in `all_ms`."""
    runs = [conversation(srv, turns, max_tokens, model, k) for k in range(n)]
    return [Turn(statistics.median(r[i].ttft_ms for r in runs), runs[0][i].prompt_tokens, runs[0][i].cached_tokens,
                 [r[i].ttft_ms for r in runs]) for i in range(turns)]


def start_server(name: str, model_path: str, threads: int, ctx: int, parallel: int, logdir: str) -> ServerProcess:
    port = free_port()
    if name == "edgellm":
        cmd = [sys.executable, "-m", "edgellm.cli", "serve", model_path, "--port", str(port), "--threads", str(threads),
               "--ctx", str(ctx), "--parallel", str(parallel), "--queue", str(4 * parallel), "--log-level", "warning"]
    elif name == "llama.cpp":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1", "--port",
               str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
               "--interrupt_requests", "False"]  # (its default: a new request interrupts the running one)
    else:
        raise ValueError(f"unknown server {name!r} (edgellm, llama.cpp)")
    return ServerProcess(name, cmd, port, os.path.join(logdir, f"serve-bench-{name}.log"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgellm.bench.serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a .gguf path or catalog name (default: the default model)")
    ap.add_argument("--threads", "-t", type=int, default=None, help="threads of both servers (default: physical cores)")
    ap.add_argument("--clients", default="1,2,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", "-n", type=int, default=128, help="tokens each client asks for")
    ap.add_argument("--rounds", "--reps", "-r", type=int, default=3, dest="rounds",
                    help="rounds over all the concurrency levels, interleaved (each level's median is reported)")
    ap.add_argument("--turns", type=int, default=10, help="turns of the conversation (0: skip)")
    ap.add_argument("--turn-tokens", type=int, default=48, help="max tokens of each conversation answer")
    ap.add_argument("--conversations", type=int, default=3,
                    help="conversations run (each turn's TTFT is their median)")
    ap.add_argument("--ctx", type=int, default=4096, help="context of both servers")
    ap.add_argument("--servers", default="edgellm,llama.cpp", help="comma-separated: edgellm, llama.cpp")
    ap.add_argument("--logdir", default=".", help="where the servers' logs go")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of tables")
    a = ap.parse_args(argv)

    from ..runtime.engine import physical_cores
    from ..runtime.fetch import resolve_model
    path = str(resolve_model(a.model))
    threads = a.threads or physical_cores()
    levels = [int(x) for x in a.clients.split(",") if x.strip()]
    if not levels or min(levels) < 1 or a.tokens < 2 or a.rounds < 1:
        ap.error("--clients must list levels >= 1, --tokens must be >= 2 and --rounds >= 1")
    servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    eog = _eog_ids(path)
    ban = {str(t): -100 for t in eog}
    rows: list[Row] = []
    convs: dict[str, list[Turn]] = {}
    for name in servers:
        print(f"# {name}: starting ({threads} threads, ctx {a.ctx})", file=sys.stderr)
        with start_server(name, path, threads, a.ctx, max(levels), a.logdir) as srv:
            srv.wait_ready()
            model = _served_id(srv.port)
            stream_chat(srv.port, [{"role": "user", "content": "Hello"}], 8, None, model)  # warm-up (JIT, caches)
            by_level: dict[int, list[Row]] = {c: [] for c in levels}
            for rnd in range(a.rounds):
                for c in levels:
                    r = concurrency_round(srv, c, a.tokens, ban, model, rnd)
                    by_level[c].append(r)
                    if not a.json:
                        print(f"# {name} x{c} (round {rnd + 1}): {r.aggregate_tps:.1f} tok/s", file=sys.stderr,
                              flush=True)
            for c in levels:
                row = merge_rounds(by_level[c])
                rows.append(row)
                if a.json:
                    print(json.dumps(asdict(row)), flush=True)
            if a.turns:
                convs[name] = conversations(srv, max(1, a.conversations), a.turns, a.turn_tokens, model)
                if a.json:
                    print(json.dumps({"server": name, "conversation_ttft_ms": [t.ttft_ms for t in convs[name]],
                                      "conversation_turns": [asdict(t) for t in convs[name]]}), flush=True)
    if not a.json:
        print(report(rows, convs, path, threads, a.tokens))
    return 0


def _eog_ids(path: str) -> list[int]:
    from ..runtime.gguf_file import GGUFFile
    from ..runtime.tokenizer import Tokenizer
    return sorted(Tokenizer.from_gguf(GGUFFile(path)).eog_ids)


def _served_id(port: int) -> str:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    data = json.loads(conn.getresponse().read())
    conn.close()
    return data["data"][0]["id"]


def report(rows: list[Row], convs: dict[str, list[Turn]], path: str, threads: int, tokens: int) -> str:
    out = [f"model {os.path.basename(path)}, {threads} threads, {tokens} tokens per client", "",
           "| server | clients | aggregate tok/s | decode tok/s per client | TTFT p50 ms | TTFT p95 ms | peak RSS MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
        err = f" ({r.errors} failed)" if r.errors else ""
        out.append(f"| {r.server} | {r.clients} | {r.aggregate_tps:.1f}{err} | {r.decode_tps_per_client:.1f} | "
                   f"{r.ttft_p50_ms:.0f} | {r.ttft_p95_ms:.0f} | {rss} |")
    for name, turns in convs.items():
        n = len(turns[0].all_ms or [0])
        out += ["", f"{name} conversation TTFT per turn (ms{f', median of {n}' if n > 1 else ''}): "
                + ", ".join(f"{t.ttft_ms:.0f}" for t in turns)]
        if n > 1:
            out.append(f"{name} conversation TTFT per turn, each conversation (ms): "
                       + "; ".join(", ".join(f"{t.all_ms[j]:.0f}" for t in turns) for j in range(n)))
        if all(t.prompt_tokens is not None and t.cached_tokens is not None for t in turns):
            out.append(f"{name} prompt tokens run / in the prompt per turn: "
                       + ", ".join(f"{t.prompt_tokens - t.cached_tokens}/{t.prompt_tokens}" for t in turns))
    by = {(r.server, r.clients): r for r in rows}
    top = max((r.clients for r in rows), default=0)
    e1, e8, l8 = by.get(("edgellm", 1)), by.get(("edgellm", top)), by.get(("llama.cpp", top))
    out.append("")
    if e1 and e8 and top > 1:
        pairs = [b / a for a, b in zip(e1.rounds_tps or [e1.aggregate_tps], e8.rounds_tps or [e8.aggregate_tps]) if a]
        x = statistics.median(pairs) if pairs else float("nan")
        each = f" (rounds: {', '.join(f'{p:.2f}x' for p in pairs)})" if len(pairs) > 1 else ""
        out.append(f"goal: edgellm aggregate at {top} clients / its single stream = {x:.2f}x{each} (goal >= 3x)")
    if e8 and l8:
        x = e8.aggregate_tps / l8.aggregate_tps if l8.aggregate_tps else float("nan")
        out.append(f"goal: edgellm / llama-cpp-python server at {top} clients = {x:.2f}x (goal >= 2x)")
    if "edgellm" in convs and len(convs["edgellm"]) > 1:
        t = convs["edgellm"]
        out.append(f"goal: edgellm turn {len(t)} TTFT / turn 1 = {t[-1].ttft_ms / t[0].ttft_ms:.2f}x (goal <= 1.5x)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
