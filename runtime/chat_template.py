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


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks the assistant's part for training): its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """The prompt text for a conversation (a list of {"role": ..., "content": ...}) with a Jinja2 chat
    template, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

    template: the model's tokenizer.chat_template; None or "" falls back to ChatML
    (CHATML_TEMPLATE). Any error in the template (a syntax error, an undefined name, the
    template's own raise_exception) raises EdgeLLMError with a one-line message."""
    if not template:
        template = CHATML_TEMPLATE
    try:
        compiled = _compile(template)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax errors and the like
        raise EdgeLLMError(f"the model's chat template does not compile: {_one_line(e)}") from None
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kwargs)
    except Exception as e:  # noqa: BLE001 - raise_exception, undefined names, type errors in the template
        raise EdgeLLMError(f"chat template error: {_one_line(e)}") from None
