"""An OpenAI-compatible HTTP server over a `Backend`: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Greedy decoding only (temperature and top_p are accepted and ignored; n must be 1; no streaming).
The KV compression ratio is a server default that a request may override with the extra field
`kv_cache_compression_ratio` (openai client: `extra_body={"kv_cache_compression_ratio": 8}`). Each
response carries the usual `usage` and a `permkv` object with what the call measured (KV tokens and
bytes held, achieved ratio, seconds). Errors use OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, with a 4xx status for every bad request and 500 only for a failure of our own.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from permkv.checks import check_ratio
from permkv.models import encode_prompt
from permkv.rlm.backend import Backend, ContextTooLong

DEFAULT_MAX_TOKENS = 256  # new tokens when a request names no max_tokens


class APIError(Exception):
    """A request the server refuses, as OpenAI reports it."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, seed, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    kv_cache_compression_ratio: float | None = None  # permkv's extra: x times smaller KV (>= 1)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


def _text(content) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def chat_ids(backend: Backend, messages: list[Message]) -> list[int]:
    """Prompt ids of a conversation: the chat template (instruct models) or plain "role: text" lines."""
    turns = [{"role": m.role, "content": _text(m.content)} for m in messages]
    if backend.spec.chat:
        ids = backend.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"
    return encode_prompt(backend.tokenizer, backend.spec, text, chat=False)


def _cut_at_stop(text: str, stop) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_app(backend: Backend, ratio: float = 1.0) -> FastAPI:
    """The FastAPI app serving `backend` with default compression `ratio`."""
    ratio = check_ratio(ratio)
    app = FastAPI(title="permkv", version="0.1.0")
    created = int(time.time())

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

    def run(req: _Request, ids: list[int]):
        if req.model != backend.name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {backend.name!r}",
                           "model_not_found", "model")
        if req.n != 1:
            raise APIError(400, f"n must be 1 (greedy decoding gives one answer), got {req.n}", "invalid_value", "n")
        if req.stream:
            raise APIError(400, "stream=true is not supported", "invalid_value", "stream")
        r = ratio if req.kv_cache_compression_ratio is None else req.kv_cache_compression_ratio
        max_new = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        try:
            backend.check(len(ids), max_new, r)
        except ContextTooLong as err:
            raise APIError(400, str(err), "context_length_exceeded", "messages") from err
        except ValueError as err:
            raise APIError(400, str(err), "invalid_value", "kv_cache_compression_ratio" if "ratio" in str(err) else None) from err
        try:
            gen = backend.generate(ids, max_new, r)
        except ValueError as err:  # e.g. the engine's pool can never hold the request
            raise APIError(400, str(err), "invalid_request") from err
        text, stopped = _cut_at_stop(backend.tokenizer.decode(gen.tokens, skip_special_tokens=True), req.stop)
        reason = "stop" if stopped else gen.finish_reason
        usage = dict(prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens),
                     total_tokens=gen.prompt_tokens + len(gen.tokens))
        return text, reason, usage, gen.as_dict()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": created, "owned_by": "permkv"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        text, reason, usage, stats = run(req, chat_ids(backend, req.messages))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": backend.name, "usage": usage, "permkv": stats,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt must be one string, got a list of {len(prompts)}", "invalid_value", "prompt")
        ids = encode_prompt(backend.tokenizer, backend.spec, prompts[0], chat=False)
        text, reason, usage, stats = run(req, ids)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": backend.name, "usage": usage, "permkv": stats,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

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
