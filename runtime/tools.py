"""OpenAI tool calling for any chat model: tools into the prompt, the model's tool calls out of its text, and the
grammar that makes a call certain when `tool_choice` asks for one.

* Prompt: the tools go to the model's chat template as `tools` (as transformers passes them). A template that
  ignores them (it renders the same text with and without) gets a system message that lists the tools and asks
  for calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; past tool calls and tool results in
  the conversation are then written in that same form, so that any template can render them.
* Output: calls are read in the format the template teaches: `<tool_call>...</tool_call>` blocks (Hermes,
  Qwen, and our own system message) or a bare `{"name": ..., "parameters"/"arguments": ...}` object (Llama 3),
  and returned in OpenAI's shape: `{"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}`.
  Only calls of the offered tools count; anything else stays plain content.
* tool_choice: "none" leaves the tools out of the prompt; "auto" lets the model choose; "required" and a named
  function constrain the output (runtime/constraints.py) to one call (or, with parallel_tool_calls, one or more)
  whose arguments follow the function's parameter schema.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from .constraints import JSON_FORMAT, ConstraintSpec, grammar_spec, json_schema_spec
from .errors import ConstraintError

HERMES, JSON_CALL = "hermes", "json"  # the two call formats: <tool_call>{...}</tool_call>, a bare JSON object
TOOL_CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)  # a last one may lack its end tag
_CLOSED_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

SYSTEM_TOOLS = (
    "You can call functions to help with the user's request. The functions, as JSON Schema signatures, are:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, and nothing else, in this form:\n"
    "<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments as a JSON object>}}}}\n</tool_call>\n"
    "If no function is needed, answer normally.")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict       # a JSON Schema for the arguments object
    raw: dict              # the tool as the request gave it (what the chat template receives)


def parse_tools(tools) -> list[Tool]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters", "strict"}}])
    checked: ConstraintError names the first thing wrong."""
    if not isinstance(tools, list) or not tools:
        raise ConstraintError("tools must be a non-empty list")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise ConstraintError(f'{where} must be {{"type": "function", "function": {{...}}}}')
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConstraintError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-' (got {name!r})")
        if name in seen:
            raise ConstraintError(f"{where}.function.name {name!r} is given twice")
        seen.add(name)
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ConstraintError(f"{where}.function.description must be a string")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ConstraintError(f'{where}.function.parameters must be a JSON Schema of "type": "object"')
        json_schema_spec(params, what=f"{where}.function.parameters")  # compiles: an invalid schema fails here
        out.append(Tool(name, desc, params, t))
    return out


def _choice(tool_choice, tools: list[Tool]) -> tuple[str, str | None]:
    """(mode, function name) of OpenAI's tool_choice: "none", "auto", "required" or
    {"type": "function", "function": {"name": ...}}."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            raise ConstraintError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function "
                                  f"(got {tool_choice!r})")
        return tool_choice, None
    f = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(f, dict) or tool_choice.get("type") != "function" or not isinstance(f.get("name"), str):
        raise ConstraintError('tool_choice must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}')
    if f["name"] not in {t.name for t in tools}:
        raise ConstraintError(f"tool_choice names function {f['name']!r}, which is not in tools")
    return "named", f["name"]


def call_format(template: str | None) -> str:
    """The call format a chat template teaches (HERMES unless it shows Llama 3's bare JSON calls)."""
    t = template or ""
    if "<tool_call>" in t:
        return HERMES
    if "<|python_tag|>" in t or ('"parameters"' in t and "tools" in t):
        return JSON_CALL
    return HERMES


@dataclass
class ToolPlan:
    """How one chat request with tools is run: its prompt, its constraint and how its output is read."""
    tools: list[Tool]
    mode: str                      # "none", "auto", "required", "named"
    function: str | None = None    # the named function
    parallel: bool = False         # more than one call allowed where the output is constrained
    format: str = HERMES
    in_template: bool = True       # the chat template renders the tools itself
    _names: set = field(default_factory=set)

    def __post_init__(self):
        self._names = {t.name for t in self.tools}

    # -- prompt
    def prompt(self, tokenizer, messages: list[dict], **template_kwargs) -> str:
        """The prompt text of `messages` (OpenAI chat messages, possibly with assistant tool_calls and
        role "tool" results) with the tools rendered for this model."""
        if self.mode == "none":
            return tokenizer.apply_chat_template(plain_messages(messages), add_generation_prompt=True,
                                                 **template_kwargs)
        if self.in_template:
            return tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True,
                                                 tools=[t.raw for t in self.tools], **template_kwargs)
        return tokenizer.apply_chat_template(self._with_system(plain_messages(messages)), add_generation_prompt=True,
                                             **template_kwargs)

    def _with_system(self, messages: list[dict]) -> list[dict]:
        text = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(
            {"name": t.name, "description": t.description, "parameters": t.parameters}) for t in self.tools))
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}] + messages[1:]
        return [{"role": "system", "content": text}] + messages

    # -- constraint
    def constraint_spec(self) -> ConstraintSpec | None:
        """The grammar of a valid answer for "required" / a named function (None otherwise)."""
        if self.mode not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.mode == "required" or t.name == self.function]
        key = "parameters" if self.format == JSON_CALL else "arguments"
        bodies = [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
                   "required": ["name", key], "additionalProperties": False} for t in tools]
        schema = dict(bodies[0] if len(bodies) == 1 else {"anyOf": bodies}, **{"x-guidance": JSON_FORMAT})
        body = f"%json {json.dumps(schema)}"
        if self.format == JSON_CALL:
            lark = f"start: call\ncall: {body}\n"
        else:
            more = ' ("\\n" call)*' if self.parallel else ""
            lark = f'start: call{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: {body}\n'
        return grammar_spec(lark, what="tool-call grammar")

    # -- output
    def parse(self, text: str, complete: bool = True) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of the model's answer, in OpenAI's shape: content None when the answer is only
        calls; tool_calls [] for a plain answer. complete=False (the answer was cut by max_tokens): only calls
        whose block is closed count."""
        if self.mode == "none":
            return text, []
        calls, rest = [], text
        if "<tool_call>" in text:
            for m in (_CALL_BLOCK if complete else _CLOSED_BLOCK).finditer(text):
                call = self._call(m.group(1))
                if call is not None:
                    calls.append(call)
                    rest = rest.replace(m.group(0), "", 1)
        else:
            s = text.strip()
            if s.startswith("<|python_tag|>"):
                s = s[len("<|python_tag|>"):].strip()
            call = self._call(s) if s.startswith("{") and complete else None
            if call is not None:
                calls, rest = [call], ""
        rest = rest.strip()
        return (rest or None) if calls else text, calls

    def _call(self, s: str) -> dict | None:
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self._names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text already
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def plan_tools(tokenizer, tools, tool_choice=None, parallel_tool_calls: bool | None = None,
               messages: list[dict] | None = None) -> ToolPlan:
    """Check OpenAI's tools / tool_choice (ConstraintError names what is wrong) and decide how this model
    gets them: through its chat template when the template renders tools, else through a system message."""
    parsed = parse_tools(tools)
    mode, name = _choice(tool_choice, parsed)
    probe = messages or [{"role": "user", "content": "hi"}]
    in_template = mode != "none" and (
        tokenizer.apply_chat_template(template_messages(probe), tools=[t.raw for t in parsed])
        != tokenizer.apply_chat_template(template_messages(probe)))
    fmt = call_format(tokenizer.chat_template) if in_template else HERMES
    return ToolPlan(parsed, mode, name, bool(parallel_tool_calls), fmt, in_template)


# ---------------------------------------------------------------------- messages for the templates
def _arguments(call: dict) -> dict:
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ConstraintError(f"a tool call's arguments are not valid JSON: {args[:80]!r}") from None
    return args


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers' chat templates expect them: tool-call arguments as objects, not JSON text."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            m = dict(m, content=m.get("content") or "", tool_calls=[
                {"type": "function", "id": c.get("id"),
                 "function": {"name": c.get("function", {}).get("name"), "arguments": _arguments(c)}}
                for c in m["tool_calls"]])
        out.append(m)
    return out


def plain_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that knows nothing of tools: calls written as <tool_call> blocks in the
    assistant's text, tool results as a user turn of <tool_response> blocks."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            blocks = [json.dumps({"name": c.get("function", {}).get("name"), "arguments": _arguments(c)})
                      for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) +
                              [f"<tool_call>\n{b}\n</tool_call>" for b in blocks])
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    return out


def openai_finish_reason(reason: str, tool_calls: list) -> str:
    """OpenAI's finish_reason for a generation that ended with `reason` (GenerationStats.finish_reason): a cut
    answer is "length" even if it began a call; a finished one is "tool_calls" when it holds calls."""
    if reason in ("length", "context"):
        return "length"
    return "tool_calls" if tool_calls else "stop"


def chat_completion(engine, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls=None,
                    max_tokens: int = 256, **kwargs) -> dict:
    """One assistant answer in OpenAI's shape: {"message": {"role": "assistant", "content", ["tool_calls"]},
    "finish_reason", "stats"}. kwargs go to stream_generate (sampler settings, seed, stop, ...)."""
    from .constraints import compile_constraint
    from .generate import stream_generate
    tok = engine.tokenizer
    plan = None
    if tools is not None:
        plan = plan_tools(tok, tools, tool_choice, parallel_tool_calls, messages)
        prompt = plan.prompt(tok, messages)
        spec = plan.constraint_spec()
        if spec is not None:
            if any(kwargs.get(k) for k in ("json_schema", "regex", "grammar", "json", "constraint")):
                raise ConstraintError("tool_choice required / a named function cannot be combined with another "
                                      "output constraint")
            kwargs["constraint"] = compile_constraint(tok, spec, n_vocab=engine.cfg.n_vocab)
    elif tool_choice is not None:
        raise ConstraintError("tool_choice needs tools")
    else:
        prompt = tok.apply_chat_template(plain_messages(messages), add_generation_prompt=True)
    ids = tok.encode(prompt, add_bos=None, parse_special=True)
    parts, last = [], None
    for r in stream_generate(engine, ids, max_tokens, **kwargs):
        parts.append(r.text)
        last = r
    text = "".join(parts)
    complete = last.stats.finish_reason not in ("length", "context")
    content, calls = plan.parse(text, complete) if plan is not None else (text, [])
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {"message": message, "finish_reason": openai_finish_reason(last.stats.finish_reason, calls),
            "stats": last.stats}
