"""`flashinfer-py serve`: an OpenAI-compatible HTTP server over one model (HTTP only; the
generation loop and the chat template are `chat.py`'s).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions`` (``"stream": true`` for server-sent events). One generation runs at a
time, on one worker thread; up to ``queue_size`` more requests wait in order, and a request
beyond that is refused at once with 429 and ``Retry-After``. A client that disconnects cancels
its generation (or its place in the queue). Errors have OpenAI's body: ``{"error": {"message",
"type", "param", "code"}}``.

With an API key, every request but ``/health`` must carry ``Authorization: Bearer KEY``
(compared in constant time), else 401. ``n`` (1 to 8) asks for several choices: they are
generated one after another in the request's turn, each sampled on its own (choice i with
``seed + i`` when a seed is given). ``logprobs`` (chat: ``logprobs: true`` and
``top_logprobs`` 0-20; completions: ``logprobs`` 0-20) report each token's log-probability
under the model's own distribution, the log-softmax of its logits before temperature, top-k
and top-p, as OpenAI reports them.

Needs the ``serve`` extra (FastAPI, uvicorn, jinja2): ``pip install 'flashinfer_py[serve]'``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"`flashinfer-py serve` needs the serve extra ({e.name} is missing): "
                      "pip install 'flashinfer_py[serve]'") from None

from .chat import ChatTemplate, Delta, normalize_messages, stream
from .errors import FlashIOError

__all__ = ["Server", "create_app", "run"]


# ------------------------------------------------------------------------------------------------
# requests (OpenAI's fields; unknown ones are accepted and ignored, as OpenAI's servers do)
# ------------------------------------------------------------------------------------------------


MAX_CHOICES = 8        # n: choices per request
MAX_TOP_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions), as OpenAI allows


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)             # llama.cpp's and vLLM's extension
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices, generated one after another
    stream: bool = False
    stream_options: Optional[dict] = None
    ignore_eos: bool = False                # vLLM's and llama.cpp's extension

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise _ApiError(400, "stop: at most 4 stop sequences", "stop")
        return stops


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def n_top(self) -> Optional[int]:
        """Alternatives to list per token; None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise _ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token


class _ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}
# The largest request body accepted (serve --max-request-bytes): a 128k-token prompt as text
# is well under 1 MB; far more is a mistake or an attack.
MAX_REQUEST_BYTES = 16 << 20


def _error_body(status: int, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


# ------------------------------------------------------------------------------------------------
# the model, one generation at a time
# ------------------------------------------------------------------------------------------------


class Server:
    """One model served to HTTP clients: a worker thread runs one generation at a time, and at
    most `queue_size` requests wait for it.

    All admission bookkeeping happens on the event loop's thread; the worker only generates
    and hands the pieces back to the loop.
    """

    def __init__(self, model, name: str, template: Optional[ChatTemplate] = None,
                 queue_size: int = 8, api_key: Optional[str] = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {max_request_bytes}")
        self.max_request_bytes = max_request_bytes
        if api_key is not None and not api_key:
            raise ValueError("the API key is empty; give a non-empty key or none")
        self.model, self.name, self.template = model, name, template
        self.queue_size, self.api_key = queue_size, api_key
        self.created = int(time.time())
        self.prompt_cache = model.new_prompt_cache()  # shared prefixes are not recomputed
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="flashinfer-generate")
        self._admitted = 0  # running + waiting
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "refused": 0}
        self.generating = False

    # -- admission (event loop thread) ----------------------------------------------------------
    def check_room(self) -> None:
        """429 now if a request could not be admitted: before its prompt is rendered and
        tokenized, so a full server spends nothing on it."""
        if self._admitted >= 1 + self.queue_size:
            self.counts["refused"] += 1
            raise _ApiError(429, f"the server is busy: one generation runs and "
                            f"{self.queue_size} requests wait; retry later", code="queue_full",
                            headers={"Retry-After": "1"})

    def admit(self) -> None:
        self.check_room()
        self._admitted += 1

    def _release(self) -> None:
        self._admitted -= 1

    def health(self) -> dict:
        """"ok", or "error" with why once the model refuses to run (a failed read that lost
        neurons, or a device that never answered one): /health then answers 503, so a
        supervisor restarts the server (every generation would fail)."""
        broken = getattr(self.model, "unusable", lambda: None)()
        return {"status": "ok" if broken is None else "error", "model": self.name,
                "generating": self.generating,
                "waiting": max(0, self._admitted - (1 if self.generating else 0)),
                "context_tokens": self.model.max_context, **self.counts,
                **({} if broken is None else {"error": broken})}

    # -- generation (worker thread) ---------------------------------------------------------------
    def submit(self, prompt_ids: list, params: dict, loop: asyncio.AbstractEventLoop,
               out: asyncio.Queue, cancel: threading.Event, n: int = 1):
        """Queue a generation of `n` choices, one after another (choice i seeded seed + i);
        their (choice index, Delta) pairs, then None (or an exception), arrive on `out`."""
        def put(item):
            loop.call_soon_threadsafe(out.put_nowait, item)

        def job():
            if cancel.is_set():  # the client left while waiting
                self.counts["cancelled"] += 1
                return
            self.generating = True
            try:
                for i in range(n):
                    seed = params.get("seed")
                    # OpenAI takes any integer seed; numpy's generators take those >= 0
                    choice = {**params, "seed": None if seed is None else (seed + i) % 2**64}
                    gen = stream(self.model, prompt_ids, prompt_cache=self.prompt_cache, **choice)
                    try:
                        for delta in gen:
                            if cancel.is_set():
                                self.counts["cancelled"] += 1
                                return
                            put((i, delta))
                    finally:
                        gen.close()
                self.counts["completed"] += 1
                put(None)
            except Exception as e:  # noqa: BLE001 - reported to the client as a 500
                self.counts["failed"] += 1
                put(e)
            finally:
                self.generating = False

        fut = self._worker.submit(job)
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return fut

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def _sampling(req: _Sampling, max_tokens: int, n_top: Optional[int], stop_ids=()) -> dict:
    return dict(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                top_p=req.top_p, seed=req.seed, stop=req.stops(), stop_ids=stop_ids,
                ignore_eos=req.ignore_eos, logprobs=n_top)


def _fit(server: Server, ids: list, max_tokens: Optional[int]) -> int:
    """max_tokens checked against the context (default: the room left)."""
    limit = server.model.max_context
    if not ids:
        raise _ApiError(400, "the prompt is empty", "prompt")
    if len(ids) + (max_tokens or 1) > limit:
        raise _ApiError(400, f"this model's context is {limit} tokens; the prompt has "
                        f"{len(ids)} and max_tokens asks for {max_tokens or 1} more (the "
                        "server's --max-context sets the limit)", "messages",
                        "context_length_exceeded")
    return max_tokens or limit - len(ids)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of `server`."""
    app = FastAPI(title="flashinfer_py", description="OpenAI-compatible API over one model "
                  "streamed from flash", version="1")
    app.state.server = server
    app.add_middleware(_BodyLimit, max_bytes=server.max_request_bytes)
    if server.api_key is not None:  # added last: outermost, so a refused key reads no body
        app.add_middleware(_BearerAuth, key=server.api_key)

    @app.exception_handler(_ApiError)
    async def api_error(_: Request, e: _ApiError):
        return JSONResponse(_error_body(e.status, e.message, e.param, e.code), e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
            return JSONResponse(_error_body(400, msg, None, "invalid_json"), 400)
        where = ".".join(loc)
        return JSONResponse(_error_body(400, f"{where}: {err.get('msg', 'invalid')}" if where
                                        else err.get("msg", "invalid request"), where or None),
                            400)

    @app.get("/health")
    async def health():
        h = server.health()
        return h if h["status"] == "ok" else JSONResponse(h, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != server.name:
            raise _ApiError(404, f"no model named {name!r}; this server has {server.name!r}",
                            "model", "model_not_found")
        return _model_card(server)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if server.template is None:
            raise _ApiError(400, f"{server.name} has no chat template; use /v1/completions, or "
                            "start the server with --chat-template FILE", "messages")
        server.check_room()
        try:
            messages = normalize_messages(req.messages)
            # in a thread: a long prompt's rendering and tokenizing must not stall the event
            # loop (other clients, /health, disconnects)
            ids = await asyncio.to_thread(server.template.encode, server.model.tokenizer,
                                          messages)
        except ValueError as e:
            raise _ApiError(400, str(e), "messages") from None
        stop_ids = server.template.stop_token_ids(server.model.tokenizer)
        max_tokens = _fit(server, ids, req.max_completion_tokens or req.max_tokens)
        params = _sampling(req, max_tokens, req.n_top(), stop_ids)
        return await _respond(server, request, req, ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise _ApiError(400, "prompt: one prompt per request (a list of one string)",
                                "prompt")
            p = p[0]
        server.check_room()
        if isinstance(p, str):
            ids = await asyncio.to_thread(server.model.tokenizer.encode, p)
        else:
            vocab = server.model.args.vocab_size
            if any(not 0 <= t < vocab for t in p):
                raise _ApiError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            ids = list(p)
        max_tokens = _fit(server, ids, req.max_tokens)
        params = _sampling(req, max_tokens, req.logprobs)
        return await _respond(server, request, req, ids, params, chat=False)

    return app


def _model_card(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": server.created,
            "owned_by": "flashinfer_py", "context_length": server.model.max_context}


async def _respond(server: Server, request: Request, req: _Sampling, ids: list, params: dict,
                   chat: bool):
    server.admit()  # 429 when full: before anything is queued
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    server.submit(ids, params, loop, out, cancel, n=req.n)
    kind = "chat.completion" if chat else "text_completion"
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "object": kind, "created": int(time.time()), "model": server.name}
    fmt = _Logprobs(server.model.tokenizer, chat) if params["logprobs"] is not None else None
    if req.stream:
        usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(request, out, cancel, head, chat, usage, req.n, fmt),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces = [[] for _ in range(req.n)]
    tokens = [[] for _ in range(req.n)]
    last: list[Optional[Delta]] = [None] * req.n
    try:
        while True:
            item = await _next(request, out, cancel)
            if item is _GONE:  # nobody reads the answer
                return Response(status_code=499)
            if isinstance(item, Exception):
                raise _generation_error(item)
            if item is None:
                break
            i, delta = item
            pieces[i].append(delta.text)
            tokens[i].extend(delta.logprobs or ())
            last[i] = delta if delta.finish_reason else last[i]
    finally:
        cancel.set()  # a no-op once done; stops the worker if this handler was cancelled
    choices = []
    for i in range(req.n):
        text = "".join(pieces[i])
        choice = ({"index": i, "message": {"role": "assistant", "content": text}}
                  if chat else {"index": i, "text": text})
        choice.update(finish_reason=last[i].finish_reason,
                      logprobs=fmt.block(tokens[i], 0) if fmt else None)
        choices.append(choice)
    return {**head, "choices": choices, "usage": _usage(last)}


_GONE = object()  # the client disconnected


async def _next(request: Request, out: asyncio.Queue, cancel: threading.Event):
    """The next item from the worker, or _GONE once the client has disconnected (which
    cancels its generation)."""
    while True:
        try:
            return await asyncio.wait_for(out.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                cancel.set()
                return _GONE


async def _events(request: Request, out: asyncio.Queue, cancel: threading.Event, head: dict,
                  chat: bool, include_usage: bool, n: int, fmt: Optional["_Logprobs"]):
    kind = head["object"] + (".chunk" if chat else "")
    offsets = [0] * n  # completions: text_offset of each choice's next token
    last: list[Optional[Delta]] = [None] * n

    def event(choice: Optional[dict], usage=None) -> str:
        body = {**head, "object": kind, "choices": [choice] if choice else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def choice(i: int, text: str, finish: Optional[str], tokens=None, first=False) -> dict:
        logprobs = None
        if fmt is not None and tokens is not None:
            logprobs = fmt.block(tokens, offsets[i])
            offsets[i] += sum(len(fmt.text(t.token)) for t in tokens)
        if chat:
            delta = {"role": "assistant", "content": text} if first else (
                {"content": text} if text else {})
            return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return {"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}

    try:
        if chat:
            for i in range(n):
                yield event(choice(i, "", None, first=True))
        while True:
            item = await _next(request, out, cancel)
            if item is _GONE:
                return
            if item is None:
                break
            if isinstance(item, Exception):
                e = _generation_error(item)
                yield f"data: {json.dumps(_error_body(e.status, e.message, e.param, e.code))}\n\n"
                return
            i, delta = item
            if delta.finish_reason:
                last[i] = delta
                yield event(choice(i, delta.text, delta.finish_reason, delta.logprobs))
            elif delta.text:
                yield event(choice(i, delta.text, None, delta.logprobs))
        if include_usage:
            yield event(None, _usage(last))
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away (or we are done): stop generating


def _usage(ends: list) -> dict:
    """Usage of a request from its choices' last Deltas: the prompt counted once."""
    first = ends[0]
    p, k = (first.prompt_tokens, first.cached_tokens) if first else (0, 0)
    c = sum(d.completion_tokens for d in ends if d)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": k}}


class _Logprobs:
    """TokenLogprobs in OpenAI's shapes: chat's ``{"content": [{token, logprob, bytes,
    top_logprobs}]}`` or completions' ``{tokens, token_logprobs, top_logprobs, text_offset}``.
    A token's text is its own bytes decoded (U+FFFD for a piece of a character)."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self._text: dict[int, tuple[str, list]] = {}

    def _entry(self, token: int) -> tuple[str, list]:
        if token not in self._text:
            raw = self.tokenizer.token_bytes(token)
            self._text[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._text[token]

    def text(self, token: int) -> str:
        return self._entry(token)[0]

    def block(self, tokens: list, offset: int) -> dict:
        if self.chat:
            return {"content": [self._chat(t) for t in tokens], "refusal": None}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for t in tokens:
            text = self.text(t.token)
            top = {self.text(i): lp for i, lp in t.top}
            top.setdefault(text, t.logprob)  # the sampled token is always listed (OpenAI)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _chat(self, t) -> dict:
        text, raw = self._entry(t.token)
        top = [{"token": self.text(i), "logprob": lp, "bytes": self._entry(i)[1]}
               for i, lp in t.top]
        return {"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top}


class _BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 with OpenAI's error body,
    whether it declares its length (refused before reading) or not (refused when the bytes
    read pass the limit), so a client cannot make the server buffer gigabytes."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope, receive, send):
        message = (f"the request body is larger than this server accepts ({self.max_bytes} "
                   "bytes; serve --max-request-bytes raises it)")
        await JSONResponse(_error_body(413, message, None, "request_too_large"), 413)(
            scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_big = True  # not a number: refuse rather than guess
        if too_big:
            return await self._refuse(scope, receive, send)
        seen = 0
        refused = False  # the 413 went out: the app's own answer is dropped

        async def limited():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # answer now and tell the app the client left: it stops reading the body
                    refused = True
                    await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not refused:
                await send(message)

        await self.app(scope, limited, guarded)


class _BearerAuth:
    """ASGI middleware: every HTTP request but ``/health`` needs ``Authorization: Bearer
    KEY``, else 401 with OpenAI's error body. The key is compared in constant time. (A plain
    ASGI class, not BaseHTTPMiddleware, so streaming and disconnect detection pass through.)"""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode("utf-8")

    def _authorized(self, scope) -> bool:
        value = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        ok = hmac.compare_digest(token.strip(), self.key)  # constant time, whatever the scheme
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or self._authorized(scope):
            return await self.app(scope, receive, send)
        message = ("a valid API key is needed: send the header 'Authorization: Bearer KEY' "
                   "with the key the server was started with (--api-key)")
        response = JSONResponse(_error_body(401, message, None, "invalid_api_key"), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _generation_error(e: Exception) -> _ApiError:
    if isinstance(e, FlashIOError):
        return _ApiError(500, f"reading the model failed: {e}", code="io_error")
    if isinstance(e, ValueError):
        return _ApiError(400, str(e))
    return _ApiError(500, f"generation failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------
# running it
# ------------------------------------------------------------------------------------------------


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        announce=print) -> None:
    """Serve until interrupted. The socket is bound before the announcement, so ``port=0``
    picks a free port and the announcement says which."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror} (is another "
                      "server using the port? pass --port)") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    config = uvicorn.Config(create_app(server), log_level=log_level, timeout_graceful_shutdown=2)
    announce(f"serving {server.name} on http://{shown}:{bound}/v1 (one generation at a time, "
             f"{server.queue_size} waiting at most; Ctrl-C stops)")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.close()
        sock.close()
