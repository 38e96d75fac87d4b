"""An OpenAI-compatible HTTP server over a `Backend`: `/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/health` and Prometheus text at `/metrics`.

Greedy by default; `temperature` > 0 (with `top_p`, `seed`) samples on the engine backend and is
refused with a 400 by the sequential one, never ignored. `stream: true` sends Server-Sent Events in
OpenAI's chunk format (`data: {chunk}` ... `data: [DONE]`); a client that goes away aborts its
request, which gives its KV blocks back. permkv's extra request fields (openai client:
`extra_body={...}`): `kv_cache_compression_ratio` (x times smaller KV, >= 1; default the server's
`--ratio`), `speculative` (lossless speculative decoding, sequential backend) and `context_id`.
Compress once, ask many: `POST /v1/contexts` (`text` or `messages`, `ratio`) reads a context once and
keeps it compressed (KVzip-style, query-agnostic); a chat request with `context_id` continues it (its
messages follow the context's), never reading it again; `GET`/`DELETE /v1/contexts/{id}`. Each response
carries the usual `usage` and a `permkv` object with what the call measured (KV tokens and bytes
held, achieved ratio, seconds, time to first token). Errors use OpenAI's shape, `{"error": {"message",
"type", "param", "code"}}`, with a 4xx status for every bad request and 500 only for our own failure.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from permkv.checks import check_ratio
from permkv.models import encode_prompt
from permkv.rlm.backend import Backend, ContextTooLong, Generation, Sampling, TokenStream

DEFAULT_MAX_TOKENS = 256  # new tokens when a request names no max_tokens
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # role -> template role


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    logprobs: bool | None = None
    kv_cache_compression_ratio: float | None = None  # permkv's extra: x times smaller KV (>= 1)
    speculative: bool = False  # permkv's extra: lossless speculative decoding (sequential backend, ratio 1)
    context_id: str | None = None  # permkv's extra: continue a context made by POST /v1/contexts


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class ContextRequest(BaseModel):
    """POST /v1/contexts: `text` (one user message) or `messages`, read once and compressed `ratio` times."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text: str | None = None
    messages: list[Message] | None = None
    ratio: float | None = None


def _text(content) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def chat_ids(backend: Backend, messages: list[Message], answer: bool = True) -> list[int]:
    """Prompt ids of a conversation: the chat template (instruct models) or plain "role: text" lines;
    `answer`: end with the assistant's turn (else the conversation so far, a context). An unknown role
    is a 400."""
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.role!r}", "invalid_value",
                           f"messages[{i}].role")
    turns = [{"role": ROLES[m.role], "content": _text(m.content)} for m in messages]
    if backend.spec.chat:
        ids = backend.tokenizer.apply_chat_template(turns, add_generation_prompt=answer, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "\n".join(f"{t['role']}: {t['content']}" for t in turns) + ("\nassistant:" if answer else "\n")
    return encode_prompt(backend.tokenizer, backend.spec, text, chat=False)


class TextStream:
    """Decoded text of a growing token list, handed out as deltas, cut at the first stop string."""

    def __init__(self, tokenizer, stop):
        self.tokenizer = tokenizer
        self.stops = [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        """The text the new tokens add (held back while it ends inside a multi-byte character)."""
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.index(s) for s in self.stops if s in text]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        elif text.endswith("\ufffd"):
            return ""
        elif self.stops:  # hold back what could still become a stop string
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[: max(len(self.sent), len(text) - hold)]
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self) -> str:
        """Everything not yet handed out, at the end of the generation."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        delta, self.sent = text[len(self.sent):], text
        return delta


class Metrics:
    """The server's Prometheus metrics (one registry per app), plus the backend's own gauges."""

    def __init__(self, backend: Backend):
        self.registry = CollectorRegistry()
        self.requests = Counter("permkv_requests", "Finished requests by outcome", ["outcome"], registry=self.registry)
        self.prompt_tokens = Counter("permkv_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry)
        self.generated = Counter("permkv_generation_tokens", "Generated tokens", registry=self.registry)
        self.ttft = Histogram("permkv_time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
        self.latency = Histogram("permkv_request_latency_seconds", "End-to-end request latency", registry=self.registry,
                                 buckets=(0.1, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.in_flight = 0
        self._ratios: list[float] = []
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 30 s
        self._lock = threading.Lock()
        self.backend = backend
        self.registry.register(self)

    def tokens(self, n: int) -> None:
        with self._lock:
            self.generated.inc(n)
            self._recent.append((time.monotonic(), n))

    def finished(self, gen: Generation, outcome: str = "ok") -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(gen.prompt_tokens)
        self.latency.observe(gen.seconds)
        if gen.ttft is not None:
            self.ttft.observe(gen.ttft)
        if gen.ratio > 1 and gen.achieved_ratio:
            with self._lock:
                self._ratios.append(gen.achieved_ratio)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - 30:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / 30

    def collect(self):
        """prometheus_client collector protocol: gauges read when /metrics is scraped."""
        yield GaugeMetricFamily("permkv_requests_in_flight", "Requests being answered", value=self.in_flight)
        yield GaugeMetricFamily("permkv_generation_tokens_per_second", "Generated tokens per second, last 30 s",
                                value=self.tokens_per_second())
        with self._lock:
            mean = sum(self._ratios) / len(self._ratios) if self._ratios else 0.0
        yield GaugeMetricFamily("permkv_achieved_ratio", "Mean achieved KV compression of compressed requests "
                                "(prompt tokens / tokens held per head)", value=mean)
        counters = {"preemptions", "steps", "computed_tokens"}
        for name, value in getattr(self.backend, "metrics", dict)().items():
            family = CounterMetricFamily if name in counters else GaugeMetricFamily
            yield family(f"permkv_{name}", f"engine {name.replace('_', ' ')}", value=value)


def create_app(backend: Backend, ratio: float = 1.0) -> FastAPI:
    """The FastAPI app serving `backend` with default compression `ratio`."""
    ratio = check_ratio(ratio)
    app = FastAPI(title="permkv", version="0.1.0")
    created = int(time.time())
    metrics = Metrics(backend)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        return JSONResponse({"error": dict(message=err.message, type=kind, param=err.param, code=err.code)}, err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        code = "invalid_json" if any(e["type"] == "json_invalid" for e in err.errors()) else "invalid_request"
        return JSONResponse({"error": dict(message=f"invalid request: {problems}", type="invalid_request_error",
                                           param=None, code=code)}, 400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        return JSONResponse({"error": dict(message=f"{type(err).__name__}: {err}", type="server_error",
                                           param=None, code="internal_error")}, 500)

    contexts: dict[str, dict] = {}  # "ctx-N" -> the backend's Context and the messages it holds

    def context_of(name: str) -> dict:
        entry = contexts.get(name)
        if entry is None:
            raise APIError(404, f"context {name!r} does not exist", "context_not_found", "context_id")
        if not backend.has_context(entry["context"].id):
            contexts.pop(name)
            raise APIError(404, f"context {name!r} was released to free KV memory; create it again",
                           "context_not_found", "context_id")
        return entry

    def context_body(name: str) -> dict:
        ctx = contexts[name]["context"]
        return {"id": name, "object": "context", "created": contexts[name]["created"], "model": backend.name,
                "ratio": ctx.ratio, **ctx.report.as_dict()}

    def start(req: _Request, ids: list[int]) -> tuple[TokenStream, int, float]:
        """Check the request and start its generation: (stream, max new tokens, ratio)."""
        if req.model != backend.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {backend.name!r}",
                           "model_not_found", "model")
        if req.n != 1:
            raise APIError(400, f"n must be 1, got {req.n}", "invalid_value", "n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", "invalid_value", "logprobs")
        cid = None if req.context_id is None else context_of(req.context_id)["context"].id
        default = ratio if cid is None else contexts[req.context_id]["context"].ratio
        r = default if req.kv_cache_compression_ratio is None else req.kv_cache_compression_ratio
        max_new = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        sampling = Sampling(req.temperature or 0.0, 1.0 if req.top_p is None else req.top_p, req.seed)
        if sampling.greedy and req.top_p not in (None, 1):
            raise APIError(400, "top_p needs temperature > 0 (temperature 0 is greedy)", "invalid_value", "top_p")
        try:
            stream = backend.stream(ids, max_new, r, req.speculative, sampling, cid)
        except KeyError as err:
            raise APIError(404, str(err).strip("'\""), "context_not_found", "context_id") from err
        except ContextTooLong as err:
            raise APIError(400, str(err), "context_length_exceeded", "messages") from err
        except ValueError as err:
            param = next((p for p in ("ratio", "temperature", "speculat") if p in str(err)), None)
            param = {"ratio": "kv_cache_compression_ratio", "speculat": "speculative"}.get(param, param)
            raise APIError(400, str(err), "invalid_value", param) from err
        return stream, max_new, r

    limiter = anyio.CapacityLimiter(1024)  # threads waiting for tokens (not the default pool of 40)

    async def events(stream: TokenStream, http: Request, text: TextStream) -> AsyncIterator[str]:
        """The generated text as it comes, cut at a stop string; aborts the generation when the client
        goes away or a stop string ends it."""
        it = iter(stream)
        done = False
        metrics.in_flight += 1
        try:
            while (tokens := await anyio.to_thread.run_sync(next, it, None, limiter=limiter)) is not None:
                metrics.tokens(len(tokens))
                delta = text.add(tokens)
                if delta:
                    yield delta
                if text.stopped or await http.is_disconnected():
                    return
            done = True
        finally:
            metrics.in_flight -= 1
            if not done:
                stream.abort()

    def outcome(stream: TokenStream, text: TextStream) -> Generation | None:
        """Count the finished request; its Generation (None when a stop string or the client ended it)."""
        gen = stream.generation
        if gen is not None:
            metrics.finished(gen)
        else:
            metrics.requests.labels("ok" if text.stopped else "aborted").inc()
        return gen

    def usage(n_prompt: int, n_tokens: int, shared: int = 0) -> dict:
        """OpenAI's usage; tokens of a shared context count as prompt tokens served from cache."""
        out = dict(prompt_tokens=n_prompt + shared, completion_tokens=n_tokens, total_tokens=n_prompt + shared + n_tokens)
        return out | ({"prompt_tokens_details": {"cached_tokens": shared}} if shared else {})

    async def answer(req: _Request, ids: list[int], http: Request, kind: str):
        stream, max_new, r = start(req, ids)
        text = TextStream(backend.tokenizer, req.stop)
        rid, now = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def body(content: str | None, reason: str | None, first: bool = False, final: bool = False) -> dict:
            """A response (`final`) or a stream chunk of `kind`."""
            if kind == "chat":
                if final:
                    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
                else:
                    delta = {} if content is None else {"content": content}
                    choice = {"index": 0, "delta": {"role": "assistant", **delta} if first else delta,
                              "finish_reason": reason}
                obj = "chat.completion" if final else "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            return {"id": rid, "object": obj, "created": now, "model": backend.name, "choices": [choice]}

        def ending(gen: Generation | None) -> tuple[str, dict]:
            reason = "stop" if text.stopped or gen is None else gen.finish_reason
            stats = gen.as_dict() if gen is not None else {"prompt_tokens": len(ids), "finish_reason": reason}
            return reason, stats

        if req.stream:
            async def sse() -> AsyncIterator[str]:
                yield f"data: {json.dumps(body('', None, first=True))}\n\n"
                async for delta in events(stream, http, text):
                    yield f"data: {json.dumps(body(delta, None))}\n\n"
                if stream.generation is None and not text.stopped:  # the client went away
                    outcome(stream, text)
                    return
                rest = text.rest()
                if rest:
                    yield f"data: {json.dumps(body(rest, None))}\n\n"
                reason, stats = ending(outcome(stream, text))
                end = body(None, reason) | {"permkv": stats}
                if req.stream_options and req.stream_options.include_usage:
                    end["usage"] = usage(len(ids), len(text.tokens), shared(stream))
                yield f"data: {json.dumps(end)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        async for _ in events(stream, http, text):
            pass
        if stream.generation is None and not text.stopped:
            outcome(stream, text)
            raise APIError(499, "the client closed the request", "client_closed")
        content = text.sent + text.rest()
        reason, stats = ending(outcome(stream, text))
        return body(content, reason, final=True) | {"usage": usage(len(ids), len(text.tokens), shared(stream)),
                                                     "permkv": stats}

    def shared(stream: TokenStream) -> int:
        return stream.generation.context_tokens if stream.generation is not None else 0

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": created, "owned_by": "permkv"}]}

    @app.get("/health")
    def health():
        alive = getattr(getattr(backend, "loop", None), "alive", True)
        return JSONResponse({"status": "ok" if alive else "engine loop stopped"}, 200 if alive else 503)

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, http: Request):
        if req.context_id is None:
            return await answer(req, chat_ids(backend, req.messages), http, "chat")
        entry = context_of(req.context_id)
        held = entry["context"].ids
        full = chat_ids(backend, entry["messages"] + list(req.messages))
        if full[: len(held)] != held:
            raise APIError(400, "the chat template renders these messages after the context differently from the "
                           "context alone; send them without context_id", "invalid_value", "context_id")
        return await answer(req, full[len(held):], http, "chat")

    @app.post("/v1/contexts")
    async def create_context(req: ContextRequest):
        if (req.text is None) == (req.messages is None):
            raise APIError(400, "give exactly one of text and messages", "invalid_value", "text")
        if req.model is not None and req.model != backend.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {backend.name!r}",
                           "model_not_found", "model")
        messages = req.messages or [Message(role="user", content=req.text)]
        ids = chat_ids(backend, messages, answer=False)
        try:
            ctx = await anyio.to_thread.run_sync(backend.create_context, ids, ratio if req.ratio is None else req.ratio)
        except ContextTooLong as err:
            raise APIError(400, str(err), "context_length_exceeded", "text") from err
        except ValueError as err:
            raise APIError(400, str(err), "invalid_value", "ratio" if "ratio" in str(err) else None) from err
        name = f"ctx-{ctx.id}"
        contexts[name] = {"context": ctx, "messages": messages, "created": int(time.time())}
        return context_body(name)

    @app.get("/v1/contexts/{name}")
    def get_context(name: str):
        context_of(name)
        return context_body(name)

    @app.delete("/v1/contexts/{name}")
    async def delete_context(name: str):
        entry = context_of(name)
        try:
            await anyio.to_thread.run_sync(backend.release_context, entry["context"].id)
        except ValueError as err:
            raise APIError(409, str(err), "context_in_use", "context_id") from err
        contexts.pop(name)
        return {"id": name, "object": "context", "deleted": True}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        if req.context_id is not None:
            raise APIError(400, "contexts continue chat conversations: use /v1/chat/completions", "invalid_value",
                           "context_id")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt must be one string, got a list of {len(prompts)}", "invalid_value", "prompt")
        return await answer(req, encode_prompt(backend.tokenizer, backend.spec, prompts[0], chat=False), http, "text")

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields the base URL ("http://host:port/v1")."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
