"""`edgellm serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn, pydantic request models).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming as
server-sent events). The handlers only translate: a request body is validated, rendered through the chat template
and tokenized, and handed to the `Scheduler` (scheduler.py), which owns the engine and batches every running
request; its events come back through an asyncio queue and are shaped as OpenAI's responses.

Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for anything the
client can fix (malformed JSON, wrong types, out-of-range values, an unknown model, a prompt longer than the
context, a body over the size limit, a missing API key) and 503 when every slot is busy and the queue is full.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConstraintError, EdgeLLMError
from .sampling import SamplerSettings
from .scheduler import (PREFILL_CHUNK, ChoiceEnd, Delta, GenParams, QueueFullError, Request, RequestEnd, RequestError,
                        Scheduler, SchedulerStoppedError, TokenLogprob)

MAX_BODY_BYTES = 8 << 20     # request bodies larger than this get 413
MAX_STOP = 16                # stop strings per request
MAX_TOP_LOGPROBS = 20        # OpenAI's limit for chat (5 for completions)
DEFAULT_SAMPLING = SamplerSettings()  # temp 0.8, top-k 40, top-p 0.95, min-p 0.05: `edgellm run`'s defaults


# ---------------------------------------------------------------------------------------------- request models
class _Strict(BaseModel):
    # unknown fields are ignored (clients send vendor extras); known ones must have the right JSON type
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Strict):
    """Fields shared by both endpoints: OpenAI's, then llama.cpp's extras (top_k, min_p, repeat_penalty,
    cache_prompt)."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    repeat_last_n: int | None = Field(None, ge=0, le=1 << 20)
    cache_prompt: bool = True


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # structured output and tool calls (runtime/constraints.py, runtime/tools.py)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


# ---------------------------------------------------------------------------------------------- the server state
@dataclass
class ServerConfig:
    model_id: str                    # what /v1/models lists and requests may name
    aliases: tuple[str, ...] = ()    # other names accepted for it (file name, path)
    api_key: str | None = None
    max_body: int = MAX_BODY_BYTES
    path: str = ""                   # the model file or folder (shown by /v1/models)


class Server:
    """The HTTP side: translates requests for the scheduler and its events into OpenAI's responses."""

    def __init__(self, engine, scheduler: Scheduler, config: ServerConfig):
        self.engine, self.scheduler, self.config = engine, scheduler, config
        self.tokenizer = engine.tokenizer
        self.n_ctx = engine.n_ctx
        self.n_vocab = engine.cfg.n_vocab
        self.created = int(time.time())
        self._outbox: _Outbox | None = None  # (made in the event loop: _submit)
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def http_error(request, exc: HTTPException):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code,
                                headers=exc.headers)

        async def api_error(request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status)

        async def internal_error(request, exc: Exception):
            return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                                status_code=500)

        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        middleware = [Middleware(_AuthMiddleware, api_key=self.config.api_key)] if self.config.api_key else []
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={HTTPException: http_error, ApiError: api_error,
                                             Exception: internal_error})

    # ------------------------------------------------------------------ simple endpoints
    async def health(self, request):
        from starlette.responses import JSONResponse
        st = self.scheduler.status()
        ok = st["running"]
        return JSONResponse({"status": "ok" if ok else "error", "model": self.config.model_id, **st},
                            status_code=200 if ok else 503)

    async def models(self, request):
        from starlette.responses import JSONResponse
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "edgellm",
            "meta": {"n_ctx": self.n_ctx, "n_vocab": self.n_vocab, "path": self.config.path}}]})

    # ------------------------------------------------------------------ parsing
    async def _read_json(self, request, model_cls):
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > limit
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:  # read on without keeping it (so that the client hears the answer), up to a point
                if size > 8 * limit:
                    break
                continue
            body.append(chunk)
        if too_big:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        raw = b"".join(body)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model_cls.model_validate(obj)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param, code="invalid_value") from None

    def _check_model(self, name: str | None) -> None:
        if name is None or name == self.config.model_id or name in self.config.aliases:
            return
        raise ApiError(404, f"the model {name!r} does not exist (this server serves {self.config.model_id!r})",
                       param="model", code="model_not_found")

    def _params(self, r: _Sampling, max_tokens: int | None, logprobs: int | None) -> GenParams:
        if r.n > self.scheduler.parallel:
            raise ApiError(400, f"n = {r.n} is more than the server's {self.scheduler.parallel} parallel slots",
                           param="n", code="invalid_value")
        if max_tokens is not None and max_tokens > self.n_ctx:
            raise ApiError(400, f"max_tokens = {max_tokens} is more than the context of {self.n_ctx} tokens",
                           param="max_tokens", code="invalid_value")
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings (got {len(stop)})", param="stop",
                           code="invalid_value")
        bias = []
        for k, v in (r.logit_bias or {}).items():
            if not (k.strip().lstrip("-").isdigit() and 0 <= int(k) < self.n_vocab):
                raise ApiError(400, f"logit_bias: {k!r} is not a token id in [0, {self.n_vocab})", param="logit_bias",
                               code="invalid_value")
            if not -100 <= v <= 100:
                raise ApiError(400, f"logit_bias: the bias of token {k} must be in [-100, 100] (got {v})",
                               param="logit_bias", code="invalid_value")
            bias.append((int(k), float(v)))
        d = DEFAULT_SAMPLING
        temp = d.temp if r.temperature is None else r.temperature
        top_k = d.top_k if r.top_k is None else r.top_k
        top_p = d.top_p if r.top_p is None else r.top_p
        if top_p == 0:  # OpenAI allows 0: only the most likely token
            top_p, top_k = 1.0, 1
        settings = SamplerSettings(temp=temp, top_k=top_k, top_p=top_p, min_p=d.min_p if r.min_p is None else r.min_p,
                                   repeat_penalty=d.repeat_penalty if r.repeat_penalty is None else r.repeat_penalty,
                                   repeat_last_n=d.repeat_last_n if r.repeat_last_n is None else r.repeat_last_n,
                                   seed=None if r.seed is None else r.seed % 2**64)
        return GenParams(max_tokens=max_tokens or self.n_ctx, settings=settings,
                         stop=tuple(s for s in stop if s), n=r.n, logprobs=logprobs, logit_bias=tuple(bias),
                         presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty,
                         cache_prompt=r.cache_prompt)

    def _check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= self.n_ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx} (start the "
                                "server with a larger --ctx, or send a shorter prompt)", param=param,
                           code="context_length_exceeded")
        return ids

    def _chat_prompt(self, r: ChatCompletionRequest):
        """(prompt ids, tool plan or None, compiled constraint or None) of a chat request. A bad schema, tool or
        tool_choice is a 400 here, before anything is queued (compiling a constraint can take a moment: this runs
        off the event loop)."""
        from .constraints import compile_constraint, json_object_spec, json_schema_spec
        from .tools import plan_tools, plain_messages, template_messages
        messages, tool_turns = [], False
        for i, m in enumerate(r.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"content parts of type {part.get('type')!r} are not supported (only "
                                            "'text' parts)", param=f"messages.{i}.content.{j}", code="unsupported")
                    texts.append(part["text"])
                content = "\n".join(texts)
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": content or ""}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            tool_turns = tool_turns or role == "tool" or bool(m.tool_calls)
            messages.append(msg)
        tok = self.tokenizer
        plan, spec, param = None, None, "response_format"
        rf = r.response_format
        kind = "text" if rf is None else rf.get("type")
        try:
            if kind == "json_object":
                spec = json_object_spec()
            elif kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or "schema" not in js:
                    raise ApiError(400, 'response_format json_schema needs {"json_schema": {"name": ..., "schema": '
                                        '{...}}}', param="response_format.json_schema", code="invalid_value")
                param = "response_format.json_schema.schema"
                spec = json_schema_spec(js["schema"], what="response_format.json_schema.schema")
            elif kind != "text":
                raise ApiError(400, f"response_format type {kind!r} is not supported (text, json_object, "
                                    "json_schema)", param="response_format.type", code="invalid_value")
            if r.tools:
                param = "tools"
                plan = plan_tools(tok, r.tools, r.tool_choice, r.parallel_tool_calls, messages)
                if spec is not None and plan.mode != "none":
                    raise ApiError(400, "response_format json_object / json_schema together with tools is not "
                                        "supported (give tool_choice 'none', or leave out one of them)",
                                   param="response_format", code="unsupported")
                if plan.mode == "none":
                    plan = None
                else:
                    spec = plan.constraint_spec()
            elif r.tool_choice not in (None, "none", "auto"):
                raise ApiError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
            if plan is not None:
                text = plan.prompt(tok, messages)
            else:
                text = tok.apply_chat_template(plain_messages(messages) if tool_turns else template_messages(messages),
                                               add_generation_prompt=True)
            constraint = compile_constraint(tok, spec, n_vocab=self.n_vocab) if spec is not None else None
        except ConstraintError as e:
            raise ApiError(400, str(e), param=param, code="invalid_value") from None
        except EdgeLLMError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        ids = self._check_prompt(tok.encode(text, add_bos=None, parse_special=True), "messages")
        return ids, plan, constraint

    def _completion_prompts(self, r: CompletionRequest) -> list[list[int]]:
        if r.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported")
        if r.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported")
        if r.best_of is not None and r.best_of != r.n:
            raise ApiError(400, "best_of is not supported (other than best_of = n)", param="best_of",
                           code="unsupported")
        p = r.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if len(prompts) * r.n > self.scheduler.parallel * max(1, self.scheduler.max_queue):
            raise ApiError(400, f"{len(prompts)} prompts x n = {r.n} is more than the server can queue",
                           param="prompt", code="invalid_value")
        out = []
        for x in prompts:
            if isinstance(x, str):
                ids = self.tokenizer.encode(x, add_bos=None, parse_special=True)
            else:
                bad = [t for t in x if not 0 <= t < self.n_vocab]
                if bad:
                    raise ApiError(400, f"token id {bad[0]} is out of range [0, {self.n_vocab})", param="prompt",
                                   code="invalid_value")
                ids = list(x)
            out.append(self._check_prompt(ids, "prompt"))
        return out

    # ------------------------------------------------------------------ running
    def _submit(self, prompts: list[list[int]], params: GenParams):
        """Hand the prompts to the scheduler; events of all of them go to one asyncio queue."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = _Outbox(loop)
        queue: asyncio.Queue = asyncio.Queue()
        outbox = self._outbox

        def emit(ev):
            outbox.put(queue, ev)

        reqs = [Request(ids, params, emit, index0=i * params.n) for i, ids in enumerate(prompts)]
        try:
            for r in reqs:
                self.scheduler.submit(r)
        except QueueFullError as e:
            self._cancel(reqs)
            raise ApiError(503, str(e), "server_error", code="server_busy") from None
        except SchedulerStoppedError as e:
            self._cancel(reqs)
            raise ApiError(503, str(e), "server_error", code="unavailable") from None
        except ValueError as e:
            self._cancel(reqs)
            raise ApiError(400, str(e), code="invalid_value") from None
        return reqs, queue

    def _cancel(self, reqs) -> None:
        for r in reqs:
            self.scheduler.cancel(r)

    def _watch(self, request, reqs) -> asyncio.Future:
        """Cancel the requests as soon as the client disconnects (a background task, started before any response)."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        watcher.add_done_callback(lambda f: f.cancelled() or self._cancel(reqs))
        return watcher

    async def _events(self, reqs, queue, watcher):
        """Yield the scheduler's events until every request has ended; if this generator is closed early (the
        client went away) the requests are cancelled."""
        left = len(reqs)
        try:
            while left:
                ev = await queue.get()
                if isinstance(ev, (RequestEnd, RequestError)):
                    left -= 1
                yield ev
        finally:
            watcher.cancel()
            self._cancel(reqs)

    async def chat_completions(self, request):
        r = await self._read_json(request, ChatCompletionRequest)
        self._check_model(r.model)
        if r.top_logprobs is not None and not r.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs = true", param="top_logprobs", code="invalid_value")
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        params = self._params(r, max_tokens, (r.top_logprobs or 0) if r.logprobs else None)
        ids, plan, constraint = await _in_thread(self._chat_prompt, r)
        if constraint is not None:
            params = replace(params, constraint=constraint)
        return await self._respond(request, r, [ids], params, chat=True, plan=plan)

    async def completions(self, request):
        r = await self._read_json(request, CompletionRequest)
        self._check_model(r.model)
        params = self._params(r, r.max_tokens if r.max_tokens is not None else 16, r.logprobs)
        prompts = await _in_thread(self._completion_prompts, r)
        return await self._respond(request, r, prompts, params, chat=False)

    async def _respond(self, request, r: _Sampling, prompts, params: GenParams, chat: bool, plan=None):
        from starlette.responses import JSONResponse, StreamingResponse
        reqs, queue = self._submit(prompts, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        shaper = _Shaper(self, rid, chat, params, plan)
        events = self._events(reqs, queue, self._watch(request, reqs))
        if r.stream:
            usage = bool(r.stream_options and r.stream_options.include_usage)
            return StreamingResponse(self._sse(events, shaper, len(prompts) * params.n, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for ev in events:
            if isinstance(ev, RequestError):
                await events.aclose()
                raise ApiError(500, ev.message, "server_error")
            shaper.add(ev)
        return JSONResponse(shaper.response())

    async def _sse(self, events, shaper: "_Shaper", n_choices: int, include_usage: bool):
        try:
            if shaper.chat:
                for i in range(n_choices):
                    yield _sse(shaper.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}], include_usage))
            async for ev in events:
                if isinstance(ev, RequestError):
                    yield _sse(ApiError(500, ev.message, "server_error").body())
                    return
                shaper.add(ev)
                if isinstance(ev, Delta) and shaper.plan is None:  # with tools, a choice is sent whole at its end
                    yield _sse(shaper.chunk([shaper.delta_choice(ev)], include_usage))
                elif isinstance(ev, ChoiceEnd):
                    if shaper.plan is not None:
                        yield _sse(shaper.chunk([shaper.tool_delta(ev.index)], include_usage))
                    yield _sse(shaper.chunk([shaper.end_choice(ev)], include_usage))
            if include_usage:
                yield _sse(shaper.chunk([], False) | {"usage": shaper.usage()})
            yield b"data: [DONE]\n\n"
        finally:
            await events.aclose()


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class _Outbox:
    """Events from the scheduler thread to the event loop's queues, handed over in batches: a decode step emits one
    per sequence, and each hand-over wakes the loop through its self-pipe (a syscall that also lets go of the GIL
    on the scheduler's thread), so events that come while a wake-up is pending ride along with it."""

    def __init__(self, loop):
        self.loop, self.items, self.lock = loop, [], threading.Lock()

    def put(self, queue, ev) -> None:
        with self.lock:
            self.items.append((queue, ev))
            if len(self.items) > 1:  # the loop has been woken and has not taken them yet
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed (shutting down): nobody listens any more
            with self.lock:
                self.items.clear()

    def _drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, ev in items:
            queue.put_nowait(ev)


async def _in_thread(fn, *args):
    """Template rendering and tokenizing, off the event loop."""
    from starlette.concurrency import run_in_threadpool
    return await run_in_threadpool(fn, *args)


async def _wait_disconnect(request) -> None:
    """Returns when the client has gone away (the body has been read by then: only a disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Shaper:
    """Collects one HTTP request's events and shapes them as OpenAI's response or stream chunks."""

    def __init__(self, server: Server, rid: str, chat: bool, params: GenParams, plan=None):
        self.server, self.id, self.chat, self.params = server, rid, chat, params
        self.plan = plan  # tools.ToolPlan: each choice's text is read for tool calls
        self.calls: dict[int, tuple[str | None, list]] = {}
        self.tok = server.tokenizer
        self.created = int(time.time())
        self.text: dict[int, list[str]] = {}
        self.lps: dict[int, list[TokenLogprob]] = {}
        self.finish: dict[int, str] = {}
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.offsets: dict[int, int] = {}

    def add(self, ev) -> None:
        if isinstance(ev, Delta):
            self.text.setdefault(ev.index, []).append(ev.text)
            if ev.logprobs:
                self.lps.setdefault(ev.index, []).extend(ev.logprobs)
        elif isinstance(ev, ChoiceEnd):
            self.finish[ev.index] = ev.finish_reason
            if self.plan is not None:
                from .tools import openai_finish_reason
                content, calls = self.plan.parse("".join(self.text.get(ev.index, [])), ev.finish_reason != "length")
                self.calls[ev.index] = (content, calls)
                self.finish[ev.index] = openai_finish_reason(ev.finish_reason, calls)
        elif isinstance(ev, RequestEnd):
            self.prompt_tokens += ev.prompt_tokens
            self.cached_tokens += ev.cached_tokens
            self.completion_tokens += ev.completion_tokens

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    # ------------------------------------------------------------------ logprobs
    def _piece(self, t: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(t, special=True)
        return b.decode("utf-8", errors="replace"), list(b)

    def _chat_logprobs(self, infos: list[TokenLogprob] | None):
        if self.params.logprobs is None:
            return None
        content = []
        for info in infos or []:
            s, b = self._piece(info.token)
            top = []
            for t, lp in info.top:
                ts, tb = self._piece(t)
                top.append({"token": ts, "logprob": lp, "bytes": tb})
            content.append({"token": s, "logprob": info.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, index: int, infos: list[TokenLogprob] | None):
        if self.params.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = self.offsets.get(index, 0)
        for info in infos or []:
            s, _ = self._piece(info.token)
            out["tokens"].append(s)
            out["token_logprobs"].append(info.logprob)
            out["top_logprobs"].append({self._piece(t)[0]: lp for t, lp in info.top})
            out["text_offset"].append(off)
            off += len(s)
        self.offsets[index] = off
        return out

    # ------------------------------------------------------------------ whole responses
    def response(self) -> dict:
        n = max(list(self.finish) + list(self.text) + [-1]) + 1
        choices = []
        for i in range(n):
            text = "".join(self.text.get(i, []))
            reason = self.finish.get(i, "length")
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                if self.plan is not None:
                    content, calls = self.calls.get(i, (text, []))
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": self._chat_logprobs(self.lps.get(i)),
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": self._completion_logprobs(i, self.lps.get(i)),
                                "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.config.model_id, "system_fingerprint": _FINGERPRINT,
                "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------------ stream chunks
    def chunk(self, choices: list, include_usage: bool) -> dict:
        d = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
             "created": self.created, "model": self.server.config.model_id, "system_fingerprint": _FINGERPRINT,
             "choices": choices}
        if include_usage:
            d["usage"] = None
        return d

    def delta_choice(self, ev: Delta) -> dict:
        if self.chat:
            return {"index": ev.index, "delta": {"content": ev.text}, "logprobs": self._chat_logprobs(ev.logprobs),
                    "finish_reason": None}
        return {"index": ev.index, "text": ev.text, "logprobs": self._completion_logprobs(ev.index, ev.logprobs),
                "finish_reason": None}

    def tool_delta(self, index: int) -> dict:
        """A tools request's choice, sent whole once it has ended: its content or its tool calls."""
        content, calls = self.calls.get(index, ("".join(self.text.get(index, [])), []))
        delta: dict = {"content": content}
        if calls:
            delta["tool_calls"] = [dict(c, index=k) for k, c in enumerate(calls)]
        return {"index": index, "delta": delta, "logprobs": self._chat_logprobs(self.lps.get(index)),
                "finish_reason": None}

    def end_choice(self, ev: ChoiceEnd) -> dict:
        if self.chat:
            return {"index": ev.index, "delta": {}, "logprobs": None,
                    "finish_reason": self.finish.get(ev.index, ev.finish_reason)}
        return {"index": ev.index, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}


def _fingerprint() -> str:
    from .. import __version__
    return f"edgellm-{__version__}"


_FINGERPRINT = _fingerprint()


class _AuthMiddleware:
    """With an API key: every path but /health needs `Authorization: Bearer KEY` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse
        resp = JSONResponse(ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                     code="invalid_api_key").body(), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


# ---------------------------------------------------------------------------------------------- running it
def model_names(name: str | None, path) -> tuple[str, tuple[str, ...]]:
    """The id the server lists for the model loaded from `path` (the name given when it is a catalog or Hub name,
    the file's stem for a path, the default model's catalog name when none was given) and the other names it
    accepts (file name, stem, path)."""
    import os
    from pathlib import Path
    from ..models.catalog import DEFAULT_MODEL
    path = Path(path)
    if name is None:
        model_id = DEFAULT_MODEL
    elif not os.path.exists(name):
        model_id = name
    else:
        model_id = path.stem
    aliases = {path.name, path.stem, str(path)} | ({name} if name else set())
    return model_id, tuple(sorted(aliases - {model_id}))


class ServerHandle:
    """A running server (uvicorn on its own thread): `url`, `stop()`. For tests and benchmarks."""

    def __init__(self, server: Server, uv_server, thread, sock):
        self.server, self._uv, self._thread, self._sock = server, uv_server, thread, sock
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._uv.should_exit = True
        self._thread.join(timeout)
        self.server.scheduler.stop(timeout)
        self._sock.close()


def build(engine, model_id: str, aliases=(), parallel: int = 4, max_queue: int = 16,
          cache_bytes: int | None = 1 << 30, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
          prefill_chunk: int = PREFILL_CHUNK, path: str = "", start: bool = True) -> Server:
    """A Server over a loaded engine, its Scheduler started on a thread of its own (start=False: not started,
    for `serve_forever`, which runs it on the calling thread)."""
    sched = Scheduler(engine, parallel=parallel, max_queue=max_queue, cache_bytes=cache_bytes,
                      prefill_chunk=prefill_chunk)
    if start:
        sched.start()
    return Server(engine, sched, ServerConfig(model_id, tuple(aliases), api_key, max_body, str(path)))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); raises EdgeLLMError when the address is taken or invalid."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise EdgeLLMError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def _uvicorn(app, log_level: str):
    import uvicorn
    cfg = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=3,
                         lifespan="off", ws="none")
    return uvicorn.Server(cfg)


def start_in_thread(server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
                    ) -> ServerHandle:
    """Serve on host:port (0: a free port) from a background thread; returns once it accepts connections."""
    import threading
    sock = bind(host, port)
    uv = _uvicorn(server.app, log_level)
    th = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="edgellm-http", daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not th.is_alive() or time.monotonic() > deadline:
            server.scheduler.stop()
            sock.close()
            raise EdgeLLMError("the HTTP server did not start")
        time.sleep(0.01)
    return ServerHandle(server, uv, th, sock)


def serve_forever(server: Server, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on a bound socket (see `bind`) until Ctrl-C / SIGTERM: HTTP on a thread, the scheduler (a server from
    `build(start=False)`) on the calling thread, the main thread, which loaded the model: one thread runs all the
    kernels (see Scheduler.run). Ctrl-C or SIGTERM shuts the HTTP server down gracefully (the scheduler serves the
    streams still open, up to 3 s), a second Ctrl-C at once; the signal is raised again afterwards, as uvicorn
    does."""
    import signal
    import threading
    uv = _uvicorn(server.app, log_level)
    caught: list[int] = []
    failed: list[BaseException] = []

    def on_signal(sig, frame):  # (runs between the scheduler's bytecodes: it only flags, the loop goes on)
        caught.append(sig)
        uv.handle_exit(sig, frame)  # uvicorn's own: graceful, a second Ctrl-C at once

    def http():
        try:
            uv.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
            failed.append(e)
        finally:
            server.scheduler.stop()  # the scheduler's loop on the calling thread returns

    prev = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    th = threading.Thread(target=http, name="edgellm-http", daemon=True)
    th.start()
    try:
        server.scheduler.run()
    finally:
        uv.should_exit = True
        th.join(10)
        server.scheduler.stop()
        sock.close()
        for s, h in prev.items():
            signal.signal(s, h)
    if failed:
        raise failed[0]
    if caught:
        signal.raise_signal(caught[0])
