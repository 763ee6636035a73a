"""Chat templates rendered the way Hugging Face transformers renders them (`apply_chat_template`):
Jinja2 in an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
extension, a pass-through `{% generation %}` tag, the globals `raise_exception` and `strftime_now`,
and a `tojson` filter that does not escape HTML or non-ASCII characters. The template is given
`messages`, `add_generation_prompt`, `tools`, `documents`, `bos_token`, `eos_token` and any extra
keyword (for instance `enable_thinking`)."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import EdgeLLMError

# What a model without tokenizer.chat_template gets: ChatML (<|im_start|>role\ncontent<|im_end|>\n),
# the format most small instruction-tuned models use and transformers' historical default.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                   " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


MAX_OUTPUT = 1 << 22  # characters a rendering may produce (a prompt, not a book): beyond it, an error
MAX_SEQUENCE = 1 << 20  # elements a template may build by repeating a string or list ('ab' * n)
MAX_EXPONENT_BITS = 4096  # bits of an integer power the template may compute


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Env(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with a bound on what one operation may build: a template read from a file must
        not allocate gigabytes ('a' * 10**10) or compute for hours (10 ** 10 ** 9)."""
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                        raise SecurityError(f"the template repeats a sequence {n} times (limit {MAX_SEQUENCE} "
                                            "elements)")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * max(1, abs(left).bit_length()) > MAX_EXPONENT_BITS:
                raise SecurityError(f"the template computes {left} ** {right}, too large a number")
            return super().call_binop(context, operator, left, right)

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks the assistant's part for training): its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def compile_template(template: str, what: str = "the model's chat template"):
    """The compiled template (cached); EdgeLLMError "<what> does not compile: <reason>" (one line) if it does
    not compile."""
    if not isinstance(template, str):
        raise EdgeLLMError(f"{what} is a {type(template).__name__}, not a string")
    try:
        return _compile(template)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax errors and the like
        raise EdgeLLMError(f"{what} does not compile: {_one_line(e)}") from None


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", what: str = "the model's chat template", **kwargs) -> str:
    """The prompt text for a conversation (a list of {"role": ..., "content": ...}) with a Jinja2 chat
    template, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

    template: the model's tokenizer.chat_template; None or "" falls back to ChatML
    (CHATML_TEMPLATE). Any error in the template (a syntax error, an undefined name, the
    template's own raise_exception, a result too large) raises EdgeLLMError with a one-line message
    that starts with `what` (the template's file and key, when the caller knows them)."""
    compiled = compile_template(template or CHATML_TEMPLATE, what)
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        out, n = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **kwargs):
            n += len(piece)
            if n > MAX_OUTPUT:
                raise EdgeLLMError(f"{what} renders more than {MAX_OUTPUT} characters")
            out.append(piece)
        return "".join(out)
    except EdgeLLMError:
        raise
    except Exception as e:  # noqa: BLE001 - raise_exception, undefined names, type errors in the template
        raise EdgeLLMError(f"{what} fails: {_one_line(e)}") from None
