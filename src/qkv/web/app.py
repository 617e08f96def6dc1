"""The attention explorer as an ASGI app (FastAPI on Starlette): the page, its static files, a JSON API.

    from qkv.web.app import create_app
    app = create_app(model_dir=None, max_queue=8, max_chars=40_000)   # testable without a socket

Routes: GET / (the page), GET /static/<name> (a fixed in-package mapping, never a file looked up
by the request path), GET /api/health, GET /api/models, GET /api/samples?model=NAME (an image model's
sample images), GET /api/openapi.json, POST /api/explain (a text, or an image model's image or sample),
POST /api/steps, POST /api/compare, POST /api/weights; every GET answers HEAD too. Every error is JSON {"error":
{"status", "code", "message"}}.

The requests and answers are the pydantic models of `qkv.web.schema` (the explain answer is
`qkv.inspect.schema.ExplainData`): FastAPI validates each request body against its model and
generates the OpenAPI document from them, served at /api/openapi.json. FastAPI's own docs pages
(which load scripts from a CDN) are off: the page stays offline, under its CSP.

Robustness: each request's cost is estimated before any work (qkv.web.service: weights formed,
memory, answer bytes) and refused over the limits (413 too_costly, naming the `qkv serve` flag).
Model work runs in a small thread pool (the event loop only waits), behind a gate that admits
requests by their memory estimate within `max_memory_mb` and lets at most `max_queue` wait; one
more gets 503 at once. A request whose client disconnects is stopped and frees its worker. Bodies
are read up to `max_body` bytes (413 beyond). Anything unexpected is a JSON 500 that says no more
than "internal error" (the traceback goes to the server's log), counted in app.state.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, which
# name the request classes that create_app makes for its limits.
import asyncio
import copy
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..inspect.schema import LEVELS, METHODS
from .schema import (
    DEFAULT_MAX_CHARS,
    DEFAULT_MODEL,
    MB,
    ApiError,
    CompareData,
    ExplainAnswer,
    Limits,
    StepsData,
    WeightsData,
    api_error,
    error_responses,
    request_models,
)
from .service import Cancelled, ModelRegistry, Plan, Service, check_limits, run_stoppable

log = logging.getLogger("qkv.web")

# The page allows only its own scripts, styles and API; colours set through element.style
# (the CSSOM) are not inline styles in the CSP sense.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

# URL name -> (package, file, media type). The only files the server ever sends.
STATIC_FILES = {
    "explain.js": ("qkv.inspect", "assets/explain.js", "text/javascript; charset=utf-8"),
    "explain.css": ("qkv.inspect", "assets/explain.css", "text/css; charset=utf-8"),
    "app.js": ("qkv.web", "static/app.js", "text/javascript; charset=utf-8"),
    "app.css": ("qkv.web", "static/app.css", "text/css; charset=utf-8"),
}
INDEX = ("qkv.web", "static/index.html", "text/html; charset=utf-8")


def _read(package: str, name: str) -> bytes:
    return resources.files(package).joinpath(*name.split("/")).read_bytes()


def error_response(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


class ClientGone(Exception):
    """The client disconnected while its request waited or ran; nobody reads the answer."""


def encode_json(obj: Any) -> bytes:
    """`obj` as compact JSON, encoded a piece at a time: a dict field by field and nested lists
    element by element, so that no single call of the C encoder (which holds the GIL throughout)
    encodes more than one innermost list. A full-maps answer of tens of MB then leaves the event
    loop its turns (/api/health answers meanwhile); one json.dumps of it held the GIL 1.5 s."""
    parts: list[str] = []
    _encode(obj, parts)
    return "".join(parts).encode("utf-8")


def _encode(obj: Any, out: list[str]) -> None:
    if isinstance(obj, dict):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            out.append(("," if i else "") + json.dumps(str(key), ensure_ascii=False) + ":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], (list, tuple, dict)):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    else:
        out.append(json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")))


class Gate:
    """Where heavy work runs: a pool of `workers` threads, admitted by memory, not by count.

    A request is first planned (its model loaded, its text tokenised, its cost estimated; in a
    small planner pool), then waits, first come first served, until its memory estimate fits in
    `max_memory` bytes beside the requests running (a request alone always fits: one over the
    budget was refused by its plan). At most `max_queue` requests wait (planning counts); one
    more is answered 503 at once. A request whose client goes away leaves the queue, or, running,
    is stopped (`stop` set: the job raises Cancelled); either way its worker and bytes come back."""

    def __init__(self, workers: int, max_queue: int, max_memory: int = 2**62):
        self.workers = workers
        self.max_queue = max_queue
        self.max_memory = max_memory
        self.running = 0
        self.waiting = 0
        self.rejected = 0
        self.cancelled = 0
        self.used = 0  # bytes reserved by the running requests
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qkv-web")
        self.planner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qkv-web-plan")
        self._waiters: deque = deque()  # [need, future] in arrival order

    def stats(self) -> dict:
        return {"workers": self.workers, "max_queue": self.max_queue, "running": self.running,
                "waiting": self.waiting, "rejected": self.rejected, "cancelled": self.cancelled,
                "memory_used": self.used, "max_memory": self.max_memory}

    def _fits(self, need: int) -> bool:
        return self.running < self.workers and (self.running == 0 or self.used + need <= self.max_memory)

    def _take(self, need: int) -> None:
        self.running += 1
        self.used += need

    def _release(self, need: int) -> None:
        self.running -= 1
        self.used -= need
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            need, fut = self._waiters[0]
            if fut.done():  # left meanwhile
                self._waiters.popleft()
                continue
            if not self._fits(need):
                return
            self._waiters.popleft()
            self._take(need)
            fut.set_result(None)

    @staticmethod
    async def _unless_gone(awaitable, gone: "asyncio.Future | None"):
        if gone is None:
            return await awaitable
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone()

    async def _acquire(self, need: int, gone: "asyncio.Future | None") -> None:
        if not self._waiters and self._fits(need):
            self._take(need)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append([need, fut])
        try:
            await self._unless_gone(asyncio.shield(fut), gone)
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release(need)  # granted as it left: give it back
            else:
                fut.cancel()
                self._wake()
            raise

    async def run(self, plan: Callable[[], Any], work: Callable[[Any], Any], gone: "asyncio.Future | None" = None,
                  memory: Callable[[Any], int] = lambda planned: 0) -> Any:
        """plan() in the planner pool, then work(plan()) in a worker once memory(plan()) bytes fit."""
        loop = asyncio.get_running_loop()
        idle = self.running < self.workers and not self._waiters and self.waiting == 0
        if self.waiting >= self.max_queue and not idle:
            self.rejected += 1
            raise ApiError(503, "busy", f"the server is busy ({self.running} running, {self.waiting} waiting); "
                                        "try again in a moment")
        self.waiting += 1
        try:
            planned = await self._unless_gone(loop.run_in_executor(self.planner, plan), gone)
            need = min(max(int(memory(planned)), 0), self.max_memory)
            await self._acquire(need, gone)
        finally:
            self.waiting -= 1

        def done(_):
            # Released when the job really ends, even if the client has gone away meanwhile.
            loop.call_soon_threadsafe(self._release, need)

        try:
            future = self.executor.submit(work, planned)
        except BaseException:
            self._release(need)
            raise
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)


class Guard:
    """Outermost ASGI layer: security headers on every response, and the JSON 500 for anything
    unexpected (counted in app.state.internal_errors; the traceback goes to the server's log)."""

    def __init__(self, app, *, state_holder: Callable[[], Any]):
        self.app = app
        self.state_holder = state_holder

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapped(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:
            self.state_holder().internal_errors += 1
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                resp = error_response(ApiError(500, "internal", "internal error; the server log has the details"))
                await resp(scope, receive, send_wrapped)


class HostCheck(TrustedHostMiddleware):
    """Starlette's Host header check (against DNS rebinding when bound to loopback), its refusal
    answered in the API's JSON error form (400 bad_host) instead of plain text."""

    def __init__(self, app, allowed_hosts: list[str]):
        async def accepted(scope, receive, send):
            scope["qkv.host_accepted"] = True
            await app(scope, receive, send)

        super().__init__(accepted, allowed_hosts=allowed_hosts, www_redirect=False)

    async def __call__(self, scope, receive, send):
        async def answer(message):
            if scope.get("qkv.host_accepted") or scope["type"] != "http":
                await send(message)
            elif message["type"] == "http.response.start":  # the refusal: ours instead, its body dropped
                refusal = ApiError(400, "bad_host", "this server answers only to its own address")
                await error_response(refusal)(scope, receive, send)

        await super().__call__(scope, receive, answer)


class GetRoute(APIRoute):
    """A GET route that answers HEAD too, as Starlette's own routes do (a 405 elsewhere says
    Allow: GET, HEAD); `as_documented` is the route as the OpenAPI document lists it: GET."""

    def __init__(self, path: str, endpoint: Callable, **kwargs: Any):
        super().__init__(path, endpoint, **kwargs)  # its operation id made of GET alone
        self.methods.add("HEAD")

    def as_documented(self) -> "GetRoute":
        route = copy.copy(self)
        route.methods = self.methods - {"HEAD"}
        return route


class _ReadBody(Request):
    """A request whose body was read and parsed already (FastAPI's custom-request pattern)."""

    def __init__(self, request: Request, raw: bytes, parsed: Any):
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._parsed


async def read_json(request: Request, max_body: int) -> tuple[bytes, Any]:
    """(the body, its JSON) of a POST: 415 unless sent as application/json, 413 beyond
    `max_body` bytes (counted while reading), 400 for a bad Content-Length or malformed JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with Content-Type: application/json; got {ctype[:60]!r}")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "the Content-Length header is not a number")
        if int(declared) > max_body:
            raise ApiError(413, "body_too_large", f"the body has {declared} bytes; the limit is {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, "body_too_large", f"the body is over the limit of {max_body} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return raw, json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "malformed_json", "the body is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {str(exc)[:120]}") from None


def create_app(*, model_dir: str | None = None, max_queue: int = 8, max_chars: int = DEFAULT_MAX_CHARS,
               max_body: int | None = None, workers: int = 2, registry: ModelRegistry | None = None,
               allowed_hosts: list[str] | None = None, max_cost: int = Limits.max_cost,
               max_answer_mb: int = Limits.max_answer // MB, max_memory_mb: int = Limits.max_memory // MB,
               max_session_mb: int = Limits.max_sessions // MB, max_pick: int = Limits.max_pick,
               max_image_mb: int = Limits.max_image_bytes // MB,
               max_image_pixels: int = Limits.max_image_pixels) -> FastAPI:
    """The explorer app.

    Args:
        model_dir: a folder whose sub-folders (Hugging Face model folders) are offered by name.
        max_queue: requests that may wait for a worker; one more gets 503.
        max_chars: the longest text (per sentence) explained; longer gets 413.
        max_body: the largest request body in bytes; larger gets 413 (default: 12 x max_chars
            + 64 KiB: two texts, each character escaped as \\uXXXX; or more, the base64 of an image of
            max_image_mb + 64 KiB).
        workers: jobs run at once (threads; torch uses every core within one job), within max_memory_mb.
        registry: the models (tests pass one with a stub loader); default: bundled + model_dir.
        allowed_hosts: Host header names accepted (None: any; `qkv serve` on loopback passes
            127.0.0.1, localhost and ::1).
        max_cost: attention weights one request may make the model form (tokens^2 x layers x heads).
        max_answer_mb: the largest JSON answer (estimated before the work).
        max_memory_mb: what the running requests may hold together (each one's estimate).
        max_session_mb: recorded results kept for /api/weights (an LRU by bytes).
        max_pick: layers, heads and rows one /api/weights request may name (each).
        max_image_mb: the largest image file an image model's request may upload (in the JSON body,
            base64); larger gets 413 image_too_large.
        max_image_pixels: the most pixels (width x height, read from the file's header before
            decoding) of an uploaded image; more gets 413 image_too_large.
    """
    check_limits({"max_chars": max_chars, "workers": workers, "max_cost": max_cost,
                  "max_answer_mb": max_answer_mb, "max_memory_mb": max_memory_mb,
                  "max_session_mb": max_session_mb, "max_pick": max_pick, "max_image_mb": max_image_mb,
                  "max_image_pixels": max_image_pixels})
    if max_body is None:
        max_body = max(12 * max_chars, (max_image_mb * MB + 2) // 3 * 4) + 64 * 1024
    check_limits({"max_body": max_body})
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0; got {max_queue!r}")
    assert max_body is not None
    limits = Limits(max_chars=max_chars, max_body=max_body, max_cost=max_cost, max_answer=max_answer_mb * MB,
                    max_memory=max_memory_mb * MB, max_sessions=max_session_mb * MB, max_pick=max_pick,
                    max_image_bytes=max_image_mb * MB, max_image_pixels=max_image_pixels)
    service = Service(registry if registry is not None else ModelRegistry(model_dir), limits)
    gate = Gate(workers, max_queue, limits.max_memory)
    static = {name: (_read(pkg, path), media) for name, (pkg, path, media) in STATIC_FILES.items()}
    index = _read(INDEX[0], INDEX[1])
    ExplainRequest, StepsRequest, CompareRequest, WeightsRequest = request_models(limits)
    requests = {"/api/explain": ExplainRequest, "/api/steps": StepsRequest, "/api/compare": CompareRequest,
                "/api/weights": WeightsRequest}

    class JsonRoute(APIRoute):
        """A POST route whose body is read under the limits before FastAPI validates it."""

        def get_route_handler(self) -> Callable:
            handler = super().get_route_handler()

            async def read_then_handle(request: Request) -> Response:
                raw, parsed = await read_json(request, limits.max_body)
                return await handler(_ReadBody(request, raw, parsed))
            return read_then_handle

    async def api_error_answer(request: Request, exc: ApiError) -> Response:
        headers = {"retry-after": "1"} if exc.status == 503 else None
        return error_response(exc, headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "no such page or endpoint", 405: f"{request.method} is not allowed here"}.get(
            exc.status_code, str(exc.detail)[:200])
        return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), message),
                              dict(exc.headers) if exc.headers else None)

    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(api_error(list(exc.errors()), requests[request.url.path], exc.body))

    app = FastAPI(title="qkv attention explorer", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="The JSON API of `qkv serve`. Errors are {\"error\": {status, code, message}}. "
                              "Unknown paths answer 404 and wrong methods 405, in the same form.",
                  exception_handlers={ApiError: api_error_answer, HTTPException: http_error,
                                      RequestValidationError: invalid})

    async def page(request: Request) -> Response:
        return Response(index, media_type=INDEX[2], headers={"cache-control": "no-cache"})

    async def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])
        if found is None:
            raise ApiError(404, "not_found", "no such file")
        body, media = found
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    app.add_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_route("/static/{name}", static_file, methods=["GET"], include_in_schema=False)

    def get(path: str, summary: str, errors: tuple[int, ...] = (500,)) -> Callable:
        def register(endpoint: Callable) -> Callable:
            app.router.add_api_route(path, endpoint, methods=["GET"], summary=summary, response_model=None,
                                     responses=error_responses(*errors), route_class_override=GetRoute)
            return endpoint
        return register

    @get("/api/health", "liveness and queue state; never waits for a model")
    async def health() -> dict:
        return {"status": "ok", "queue": gate.stats(), "loaded_models": service.registry.loaded(),
                "sessions": service.sessions.stats()}

    @get("/api/models", "the models this server offers (each with its modality: \"text\" or \"image\"), its "
                        "limits (image_limits: of an uploaded image), methods and levels")
    async def models() -> dict:
        registry = service.registry
        entries = [{"name": e.name, "source": e.source, "modality": registry.modality(e.name)}
                   for e in registry.entries()]
        return {"models": entries, "default": DEFAULT_MODEL, "limits": limits.to_dict(),
                "image_limits": limits.image_dict(), "methods": list(METHODS), "levels": list(LEVELS)}

    @get("/api/samples", "an image model's sample images, {\"model\", \"samples\": [{\"name\", \"pixels\"}]} "
                         "(pixels: a PNG data URL); explain one with POST /api/explain {\"model\", \"sample\": name}; "
                         "[] for a text model", errors=(404, 422, 500))
    async def samples(model: str | None = Query(None, description="a model name from GET /api/models (required)")
                      ) -> dict:
        if model is None:
            raise ApiError(422, "missing_field", "the query parameter 'model' is required: /api/samples?model=NAME")
        entry = service.registry.entry(model)
        found = service.registry.samples(entry.name, limits.max_image_bytes)
        return {"model": entry.name, "modality": service.registry.modality(entry.name),
                "samples": [{"name": s.name, "pixels": s.data_url()} for s in found]}

    @get("/api/openapi.json", "this description (OpenAPI 3.1)")
    async def openapi() -> dict:
        return app.openapi()

    def document() -> dict:
        """FastAPI's document of the routes, a GET route's HEAD not listed apart (it is the GET
        without the body; FastAPI would list it as an operation of its own, of the same id)."""
        if app.openapi_schema is None:
            routes = [r.as_documented() if isinstance(r, GetRoute) else r for r in app.routes]
            app.openapi_schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                             routes=routes)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]

    async def answer(request: Request, planner: Callable[[], Plan]) -> Response:
        """Plan (estimate, refuse over the limits), wait for memory, run in a worker; stopped
        when the client disconnects meanwhile (its worker and bytes come back)."""
        stop = threading.Event()

        async def watch() -> None:  # the body is read: the next message is the disconnect
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    stop.set()
                    return

        def work(plan: Plan) -> bytes:
            # Encoded in the worker too: encoding a large answer on the event loop would stall
            # every other request meanwhile.
            return run_stoppable(stop, lambda: encode_json(plan.run()))

        watcher = asyncio.ensure_future(watch())
        try:
            body = await gate.run(planner, work, watcher, memory=lambda plan: plan.cost.memory)
        except (ClientGone, Cancelled):
            gate.cancelled += 1
            log.info("%s: the client went away; its job stopped", request.url.path)
            return Response(status_code=499)  # nobody reads it
        finally:
            watcher.cancel()
        return Response(body, media_type="application/json")

    def post(path: str, summary: str, result: type) -> Callable:
        errors = error_responses(400, 404, 405, 410, 413, 415, 422, 500, 503)

        def register(endpoint: Callable) -> Callable:
            app.router.add_api_route(path, endpoint, methods=["POST"], summary=summary, response_model=None,
                                     responses={200: {"model": result, "description": "the result"}, **errors},
                                     route_class_override=JsonRoute)
            return endpoint
        return register

    @post("/api/explain", "attention of a sentence, or of an image for an image model (ExplainResult.to_dict: "
                          "full maps, or the compact view of a "
                          "long text) and the session that keeps it for /api/weights", ExplainAnswer)
    async def explain(body: ExplainRequest, request: Request) -> Response:
        return await answer(request, service.explain(body))  # a bad request is answered now, queue full or not

    @post("/api/steps", "the three steps for one word in one head, with real numbers", StepsData)
    async def steps(body: StepsRequest, request: Request) -> Response:
        return await answer(request, service.steps(body))

    @post("/api/compare", "two sentences side by side, with the per-head divergence of a focus word", CompareData)
    async def compare(body: CompareRequest, request: Request) -> Response:
        return await answer(request, service.compare(body))

    @post("/api/weights", "full rows of chosen layers, heads and rows, from the recorded queries and keys of a "
                          "session (ExplainResult.weights_dict)", WeightsData)
    async def weights(body: WeightsRequest, request: Request) -> Response:
        return await answer(request, service.weights(body))

    app.state.internal_errors = 0
    app.state.gate = gate
    app.state.service = service
    app.state.limits = limits
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)  # type: ignore[arg-type]
    app.add_middleware(Guard, state_holder=lambda: app.state)  # type: ignore[arg-type]
    return app
