"""The FastAPI app: the dialects' routers, and in one place the key check, the Host and Origin checks, the
body's limit and deadline, and the error shapes (OpenAI's everywhere, A1111's under /sdapi), so no route
repeats them."""

import asyncio
import hmac
import ipaddress
import logging
import shutil
import tempfile
from base64 import b64decode
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from mflux.errors import MfluxError
from mflux.server import a1111_api, mflux_api, openai_api
from mflux.server.core import ApiError, Server, ServerSettings

log = logging.getLogger("mflux.server")
KEY_COOKIE = "mflux_api_key"
UI = resources.files("mflux.server") / "ui"


def create_app(settings: ServerSettings, loader=None) -> FastAPI:
    """The app over one Server; `loader(name, loras)` replaces Flux1.from_name (tests only)."""
    server = Server(settings, loader)
    own_output = settings.output_dir is None

    @asynccontextmanager
    async def lifespan(app):
        if own_output:
            server.output_dir = Path(tempfile.mkdtemp(prefix="mflux-serve-"))
        server.worker.start()  # each runner loads --model before it takes a job
        yield
        server.worker.stop()
        if own_output:
            shutil.rmtree(server.output_dir, ignore_errors=True)

    # no /docs: FastAPI's Swagger page loads its scripts from a CDN, and the server's pages load nothing remote
    app = FastAPI(title="mflux", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    app.include_router(mflux_api.router)
    _pages(app, server)
    _errors(app)
    app.add_middleware(Guard, server=server)
    app.add_middleware(NoFraming)
    return app


def _pages(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    def health():
        w = server.worker
        error = w.load_error()  # the model requests get by default did not load: 503, saying why
        body = {
            "status": "error" if error else "ok",
            "error": error,
            "model": w.loaded_model(),
            "default_model": w.model_name,
            "queue": w.queued(),
            "running": w.current is not None,
            "queue_limit": w.max_queue,
            "backend": w.backend,
            "workers": w.workers(),
        }
        return JSONResponse(body, 503) if error else body

    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse((UI / "index.html").read_text())

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        # the key goes into an HttpOnly cookie set here, so no script on the page can read it
        key = server.settings.api_key
        given = (await request.form()).get("key")
        if not key or not isinstance(given, str) or not _same(given, key):
            return HTMLResponse((UI / "login.html").read_text(), 401)
        response = Response(status_code=303, headers={"Location": "/"})
        response.set_cookie(
            KEY_COOKIE,
            quote(key, safe=""),
            max_age=365 * 24 * 3600,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.get("/outputs/{name}", include_in_schema=False)
    def output(name: str):
        path = server.output_path(name)
        if path is None:
            raise ApiError(404, f"no output image {name!r}", "name")
        return FileResponse(path, media_type="image/png")

    app.mount("/ui", StaticFiles(directory=str(UI)), name="ui")


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(request.url.path, e)

    @app.exception_handler(MfluxError)
    async def user_error(request: Request, e: MfluxError):
        return error_response(request.url.path, ApiError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error_response(
                request.url.path,
                ApiError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"),
            )
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(
                request.url.path,
                ApiError(400, "the body must be a JSON object (Content-Type: application/json)"),
            )
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")  # a model's own check (utf8_text) says it all
        message = f"{param}: {msg}" if param else msg
        return error_response(request.url.path, ApiError(400, message, param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = (
            f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        )
        return error_response(request.url.path, ApiError(e.status_code, message, headers=e.headers))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(request.url.path, ApiError(500, "internal server error (see the server's log)"))


def error_response(path: str, e: ApiError) -> JSONResponse:
    if path.startswith("/sdapi/"):
        body = {"error": e.type, "detail": e.message, "body": "", "errors": ""}
    else:
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, e.status, headers=e.headers)


class BodyTooLarge(HTTPException):
    # an HTTPException, since FastAPI turns any other error raised while reading a body into a 400
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the {limit / 2**20:g} MiB limit")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        # the rest of the body may still come: the connection closes rather than read it
        super().__init__(
            408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"}
        )


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = ("localhost",)


class Guard:
    """ASGI middleware, before any work: the Host check (without a key); the Origin check on requests that
    change state; the API key (Bearer, HTTP Basic for /sdapi, or the web UI's cookie) on every route but
    /health and the page's login; and the body's limit (by Content-Length and while reading) and deadline."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        settings = self.server.settings
        key = settings.api_key
        refusal = None
        if not key:
            refusal = host_refusal(headers.get("host", ""), settings.allowed_hosts)
        if refusal is None and scope["method"] not in SAFE_METHODS:
            refusal = origin_refusal(headers, scope.get("scheme", "http"))
        if refusal is not None:
            return await error_response(path, ApiError(403, refusal))(scope, receive, send)
        if key and path not in ("/health", "/login") and not authorized(headers, path, key):
            return await _unauthorized(path)(scope, receive, send)
        limit = self.server.limits.body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            e = BodyTooLarge(limit)
            return await error_response(path, ApiError(413, e.detail))(scope, receive, send)
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive):
        """`receive`, refusing a body past the size limit or still arriving past the deadline."""
        limit = self.server.limits.body_bytes
        seconds = self.server.limits.body_seconds
        deadline = asyncio.get_running_loop().time() + seconds
        seen, whole = 0, False

        async def bounded():
            nonlocal seen, whole
            if whole:  # the body is in: later calls wait for the client to go away, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise BodyTimeout(seconds) from None
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        return bounded


def host_refusal(host: str, allowed: tuple[str, ...]) -> str | None:
    """Why a server without a key refuses this Host header, or None. A page on an attacker's domain that
    re-resolves to 127.0.0.1 (DNS rebinding) is same-origin to the browser, but its requests still name
    that domain in Host; loopback names and IP addresses cannot be rebound, so they always pass."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # a malformed IPv6 literal
        name = ""
    if name in LOOPBACK_NAMES or name in (h.lower() for h in allowed):
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    return (
        f"Host {host!r} is not served without an API key (add --allowed-hosts {name or 'NAME'}, "
        "or set --api-key)"
    )


def origin_refusal(headers: dict, scheme: str) -> str | None:
    """Why a request that changes state is refused as coming from another site's page (CSRF), or None.
    A browser names the page's origin in Origin and Sec-Fetch-Site; other clients send neither. A request
    with Authorization passes: a browser sends that header cross-origin only after a CORS preflight, which
    this server never allows."""
    if "authorization" in headers:
        return None
    site = headers.get("sec-fetch-site")
    origin = headers.get("origin")
    own = f"{scheme}://{headers.get('host', '')}"
    if site is not None and site not in ("same-origin", "none"):
        return f"refused: a page of another site (Sec-Fetch-Site: {site}) may not change anything here"
    if origin is not None and origin != own:
        return (
            f"refused: the page at {origin!r} is not this server's ({own}); only its own pages change things"
        )
    return None


class NoFraming:
    """ASGI middleware: no page of another site may frame ours (clickjacking the Generate button), and no
    browser guesses a type other than the one sent (an uploaded file rendered as HTML)."""

    HEADERS = [
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"frame-ancestors 'none'"),
        (b"x-content-type-options", b"nosniff"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def authorized(headers: dict, path: str, key: str) -> bool:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and _same(value.strip(), key):
        return True
    if scheme.lower() == "basic" and path.startswith("/sdapi/"):
        try:
            _, _, password = b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except ValueError:
            return False
        return _same(password, key)
    # the page stores the key URL-encoded (encodeURIComponent), so any character survives the cookie
    value = cookie_value(headers.get("cookie", ""), KEY_COOKIE)
    return value is not None and _same(unquote(value), key)


def cookie_value(header: str, name: str) -> str | None:
    """One cookie's value, each `name=value` pair read on its own: SimpleCookie drops every cookie after
    one it cannot parse, so another app's cookie on this host (`prefs={"theme":"dark"}`) hid ours."""
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value
    return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _unauthorized(path: str) -> Response:
    if path == "/":
        # the web UI asks for the key once; its script keeps it in a cookie
        return HTMLResponse((UI / "login.html").read_text(), 401)
    e = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
    if path.startswith("/sdapi/"):
        e = ApiError(401, "missing or wrong API key (HTTP Basic with the key as password, or Bearer KEY)")
        e.headers = {"WWW-Authenticate": 'Basic realm="mflux"'}
    return error_response(path, e)
