"""The attention explorer as an ASGI app (Starlette): the page, its static files, a JSON API.

    from qkv.web.app import create_app
    app = create_app(model_dir=None, max_queue=8, max_chars=1000)   # testable without a socket

Routes: GET / (the page), GET /static/<name> (a fixed in-package mapping, never a file looked up
by the request path), GET /api/health, GET /api/models, GET /api/openapi.json, POST /api/explain,
POST /api/steps, POST /api/compare. Every error is JSON {"error": {"status", "code", "message"}}.

Robustness: model work runs in a small thread pool (the event loop only waits), behind a gate
that lets `workers` requests run and at most `max_queue` wait; one more gets 503 at once. Bodies
are read up to `max_body` bytes (413 beyond). Anything unexpected is a JSON 500 that says no more
than "internal error" (the traceback goes to the server's log), counted in app.state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .openapi import openapi_schema
from .service import ApiError, Limits, ModelRegistry, Service, check_limits

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


def error_response(err: ApiError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


class Gate:
    """At most `workers` jobs run (in a thread pool), at most `max_queue` wait; more: 503."""

    def __init__(self, workers: int, max_queue: int):
        self.workers = workers
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self.rejected = 0
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qkv-web")
        self._sem: Optional[asyncio.Semaphore] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def stats(self) -> dict:
        return {"workers": self.workers, "max_queue": self.max_queue, "running": self.running,
                "waiting": self.waiting, "rejected": self.rejected}

    async def run(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._loop is not loop:
            # One semaphore per event loop (a test may serve the app from several loops in turn).
            self._sem, self._loop = asyncio.Semaphore(self.workers), loop
        sem = self._sem
        if sem.locked() and self.waiting >= self.max_queue:
            self.rejected += 1
            raise ApiError(503, "busy", f"the server is busy ({self.running} running, {self.waiting} waiting); "
                                        "try again in a moment")
        self.waiting += 1
        try:
            await sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

        def done(_):
            # Released when the job really ends, even if the client has gone away meanwhile.
            def release():
                self.running -= 1
                sem.release()
            loop.call_soon_threadsafe(release)

        try:
            future = self.executor.submit(fn)
        except BaseException:
            self.running -= 1
            sem.release()
            raise
        future.add_done_callback(done)
        return await asyncio.wrap_future(future)


class Guard:
    """Outermost ASGI layer: security headers on every response, an optional Host check
    (against DNS rebinding when bound to loopback), and the JSON 500 for anything unexpected."""

    def __init__(self, app, *, state_holder: Callable[[], Any], allowed_hosts: Optional[list[str]] = None):
        self.app = app
        self.state_holder = state_holder
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.allowed_hosts:
                resp = error_response(ApiError(400, "bad_host", "this server answers only to its own address"))
                await self._send_with_headers(resp, scope, receive, send)
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
                await self._send_with_headers(resp, scope, receive, send)

    async def _send_with_headers(self, resp, scope, receive, send):
        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + SECURITY_HEADERS)
            await send(message)
        await resp(scope, receive, send_wrapped)


def create_app(*, model_dir: Optional[str] = None, max_queue: int = 8, max_chars: int = 1000,
               max_body: int = 64 * 1024, workers: int = 1, registry: Optional[ModelRegistry] = None,
               allowed_hosts: Optional[list[str]] = None) -> Starlette:
    """The explorer app.

    Args:
        model_dir: a folder whose sub-folders (Hugging Face model folders) are offered by name.
        max_queue: requests that may wait for a worker; one more gets 503.
        max_chars: the longest text (per sentence) explained; longer gets 413.
        max_body: the largest request body in bytes; larger gets 413.
        workers: model jobs run at once (threads; torch uses every core within one job).
        registry: the models (tests pass one with a stub loader); default: bundled + model_dir.
        allowed_hosts: Host header names accepted (None: any; `qkv serve` on loopback passes
            127.0.0.1, localhost and ::1).
    """
    check_limits({"max_chars": max_chars, "max_body": max_body, "workers": workers})
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0; got {max_queue!r}")
    limits = Limits(max_chars=max_chars, max_body=max_body)
    service = Service(registry if registry is not None else ModelRegistry(model_dir), limits)
    gate = Gate(workers, max_queue)
    static = {name: (_read(pkg, path), media) for name, (pkg, path, media) in STATIC_FILES.items()}
    index = _read(INDEX[0], INDEX[1])
    schema = openapi_schema(limits)

    async def page(request: Request) -> Response:
        return Response(index, media_type=INDEX[2], headers={"cache-control": "no-cache"})

    async def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])
        if found is None:
            raise ApiError(404, "not_found", "no such file")
        body, media = found
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queue": gate.stats(), "loaded_models": service.registry.loaded()})

    async def models(request: Request) -> Response:
        entries = [{"name": e.name, "source": e.source} for e in service.registry.entries()]
        return JSONResponse({"models": entries, "default": "minilm", "limits": limits.to_dict(),
                             "methods": ["raw", "rollout", "value-norm"], "levels": ["word", "token"]})

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    async def read_json(request: Request) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           f"send the body as JSON with Content-Type: application/json; got {ctype[:60]!r}")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad_request", "the Content-Length header is not a number")
            if int(declared) > limits.max_body:
                raise ApiError(413, "body_too_large", f"the body has {declared} bytes; the limit is {limits.max_body}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise ApiError(413, "body_too_large", f"the body is over the limit of {limits.max_body} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_json", "the body is not UTF-8 text") from None
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {str(exc)[:120]}") from None

    def operation(check: Callable[[Any], Callable[[], dict]]):
        async def endpoint(request: Request) -> Response:
            body = await read_json(request)
            job = check(body)  # a bad request is answered now, queue full or not

            def work() -> bytes:
                # Encoded in the worker too: a 200-word result is tens of MB of JSON, and
                # encoding it on the event loop would stall every other request meanwhile.
                return json.dumps(job(), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")

            payload = await gate.run(work)
            return Response(payload, media_type="application/json")
        return endpoint

    async def api_error(request: Request, exc: ApiError) -> Response:
        headers = {"retry-after": "1"} if exc.status == 503 else None
        return error_response(exc, headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "no such page or endpoint", 405: f"{request.method} is not allowed here"}.get(
            exc.status_code, str(exc.detail)[:200])
        return error_response(ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), message),
                              dict(exc.headers) if exc.headers else None)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/models", models, methods=["GET"]),
        Route("/api/openapi.json", openapi, methods=["GET"]),
        Route("/api/explain", operation(service.explain), methods=["POST"]),
        Route("/api/steps", operation(service.steps), methods=["POST"]),
        Route("/api/compare", operation(service.compare), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.internal_errors = 0
    app.state.gate = gate
    app.state.service = service
    app.state.limits = limits
    app.add_middleware(Guard, state_holder=lambda: app.state, allowed_hosts=allowed_hosts)  # type: ignore[arg-type]
    return app
