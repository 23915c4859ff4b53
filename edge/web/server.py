"""The `health` component: aiohttp on the daemon's event loop.

Routes: `/metrics` (Prometheus exposition), `/healthz` (200 ok / 503 with reasons), the store
page `/` with its files under `/static/`, and the JSON it polls: `/api/status`,
`/api/analytics`. The server runs on the event loop on purpose: if the loop is wedged,
`/healthz` does not answer either. A port that cannot be bound or a certificate that cannot
be loaded is logged and shown in `edge status`, but does not stop the daemon (collecting data
matters more than the page), and a TLS failure never falls back to plain HTTP.

Hygiene kept from the hand-written server: at most MAX_INFLIGHT requests at once (503 beyond),
request lines and header fields of at most LINE_LIMIT bytes (400), at most MAX_HEADER_LINES
headers (431), GET/HEAD only (405), an idle or silent connection closed after KEEPALIVE_S,
`/metrics`, `/healthz` and errors answered with `Connection: close` as before; the page and its
APIs keep the connection for the next poll. No access log: a request line may carry the token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector
from prometheus_client.exposition import choose_encoder

from edge.aio import bounded
from edge.buffer import BufferStats
from edge.config import is_loopback
from edge.health import EdgeCollector, Liveness, Snapshot, health_doc, take_snapshot
from edge.web.access import COOKIE, bearer, load_or_create_token, server_tls, token_matches
from edge.web.views import analytics_doc, config_info, status_doc

if TYPE_CHECKING:
    from edge.supervisor import Runtime

log = structlog.get_logger("edge.health")

KEEPALIVE_S = 5.0  # an idle connection (or one that never sends a request) is closed after this
MAX_INFLIGHT = 8
MAX_HEADER_LINES = 64
LINE_LIMIT = 8190
STATIC = {  # name -> content type; the only files served
    "app.js": "text/javascript",
    "style.css": "text/css",
    "icon.svg": "image/svg+xml",
}
PAGE_PATHS = frozenset({"/", "/favicon.ico", "/api/status", "/api/analytics", *(f"/static/{n}" for n in STATIC)})
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Rejections(logging.Handler):
    """aiohttp's own error log (malformed requests, mostly), counted and logged without its
    traceback or message: those quote the request line, which may carry the token."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        exc = record.exc_info[1] if record.exc_info else None
        log.debug("health_request_rejected", error=type(exc).__name__ if exc else record.levelname)


def _quiet_logger(handler: logging.Handler) -> logging.Logger:
    """A private logger for aiohttp's server that goes only to `handler` (not to the root log)."""
    # not getLogger: one logger per server with its own counter, never a global one
    logger = logging.Logger("edge.health.http")  # noqa: LOG001
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def _files() -> dict[str, bytes]:
    root = resources.files("edge.web") / "static"
    return {name: (root / name).read_bytes() for name in ("index.html", *STATIC)}


class HealthServer:
    """The `health` component; see the module docstring."""

    name = "health"

    def __init__(self, rt: Runtime, liveness: Liveness, config_path: str | None = None) -> None:
        self._rt = rt
        self._liveness = liveness
        self._config_path = config_path
        self._collector = EdgeCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        # not ProcessCollector: it needs /proc/stat, which the unit hides (ProcSubset=pid)
        for extra in (PlatformCollector, GCCollector):
            extra(registry=self.registry)
        self._runner: web.AppRunner | None = None
        self._last_stats: BufferStats | None = None
        self._token: str | None = None
        self._tls = False
        self._inflight = 0
        self._files: dict[str, bytes] = {}
        self._rejections = _Rejections()
        self.errors = 0
        self.state = "starting"
        self.listen: str | None = None
        self.error: str | None = None
        self.requests = 0

    # -- component ------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self._rt.cfg.health
        try:
            host, port = cfg.address()
            ssl_ctx = server_tls(cfg)
            if not is_loopback(host):
                self._token = load_or_create_token(cfg, self._rt.cfg.paths.state_dir)
            self._files = _files()
            runner = web.AppRunner(self._app(), access_log=None, handle_signals=False,
                                   keepalive_timeout=KEEPALIVE_S, shutdown_timeout=1.0,
                                   logger=_quiet_logger(self._rejections),
                                   max_line_size=LINE_LIMIT, max_field_size=LINE_LIMIT)
            await runner.setup()
            self._runner = runner
            await web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=32).start()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            await self._cleanup()
            self.state, self.error = "failed", str(exc)
            log.error("health_listen_failed", listen=cfg.listen, error=str(exc),
                      hint="another process holds the port? set health.listen (port 0 picks a free one); "
                           "with health.tls: are cert_file and key_file readable PEM files that match?")
            return
        self._tls = ssl_ctx is not None
        sock = runner.addresses[0]
        self.listen = f"[{sock[0]}]:{sock[1]}" if ":" in sock[0] else f"{sock[0]}:{sock[1]}"
        self.state = "listening"
        scheme = "https" if self._tls else "http"
        log.info("health_listening", listen=self.listen, page=f"{scheme}://{self.listen}/",
                 metrics=f"{scheme}://{self.listen}/metrics", token_required=self._token is not None)
        if self._token is not None and not self._tls:
            log.warning("health_token_without_tls", listen=self.listen,
                        hint="the page is reachable off this box and its token travels in clear text: "
                             "set health.tls.cert_file and key_file")

    async def stop(self) -> None:
        await self._cleanup()
        self.state = "stopped"

    async def _cleanup(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                await bounded(runner.cleanup(), 2.0)
            except TimeoutError:
                log.warning("health_stop_timeout")

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "listen": self.listen, "error": self.error, "requests": self.requests,
                "rejected": self._rejections.count, "errors": self.errors, "tls": self._tls,
                "token_required": self._token is not None}

    async def snapshot(self) -> Snapshot:
        snap = await take_snapshot(self._rt, self._liveness, self._last_stats)
        self._last_stats = snap.stats
        return snap

    # -- HTTP ---------------------------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard, self._access], client_max_size=1024)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/", self._page)
        app.router.add_get("/favicon.ico", self._favicon)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/api/analytics", self._api_analytics)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bounds and common headers around every request."""
        self.requests += 1
        if len(request.raw_headers) > MAX_HEADER_LINES:
            resp: web.StreamResponse = web.Response(status=431, text="too many headers\n")
        elif self._inflight >= MAX_INFLIGHT:  # busy: refuse rather than queue (scrapers retry)
            resp = web.Response(status=503, text="busy\n")
        else:
            self._inflight += 1
            try:
                resp = await handler(request)
            except web.HTTPException as exc:  # 404, 405: same headers as the rest
                resp = web.Response(status=exc.status, text=f"{exc.reason.lower()}\n", headers=exc.headers)
            except Exception as exc:  # a bug in a view: a 500, logged without traceback (it may quote data)
                self.errors += 1
                log.error("health_request_failed", path=request.path, error=type(exc).__name__)
                resp = web.Response(status=500, text="internal error\n")
            finally:
                self._inflight -= 1
        resp.headers.update(SECURITY_HEADERS)
        if request.path not in PAGE_PATHS or resp.status >= 400:
            resp.force_close()
        return resp

    @web.middleware
    async def _access(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Off loopback, everything but /healthz needs the token (cookie, bearer, or ?token= on /)."""
        token = self._token
        if token is None or request.path == "/healthz":
            return await handler(request)
        if request.path == "/" and "token" in request.query:
            if not token_matches(token, request.query["token"]):
                return self._refused(request)
            # the token leaves the address bar (and the history)
            resp = web.Response(status=303, headers={"Location": "/"})
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=self._tls, path="/")
            return resp
        if token_matches(token, bearer(request.headers.get("Authorization"))) or token_matches(
            token, request.cookies.get(COOKIE)
        ):
            return await handler(request)
        return self._refused(request)

    @staticmethod
    def _refused(request: web.Request) -> web.Response:
        if request.path.startswith("/api/"):
            return web.json_response({"error": "token required"}, status=401)
        body = ("This page needs the device's access token.\n"
                "Open /?token=TOKEN once; `edge status` on the device shows the address with the token.\n"
                "Prometheus: send it as Authorization: Bearer TOKEN.\n")
        return web.Response(status=401, text=body, headers={"WWW-Authenticate": 'Bearer realm="store-edge"'})

    async def _metrics(self, request: web.Request) -> web.Response:
        self._collector.snapshot = await self.snapshot()
        encoder, ctype = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": ctype})

    async def _healthz(self, _request: web.Request) -> web.Response:
        doc = health_doc(await self.snapshot())
        return web.Response(status=200 if doc["status"] == "ok" else 503, body=(json.dumps(doc) + "\n").encode(),
                            headers={"Content-Type": "application/json"})

    async def _page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._files["index.html"], headers={
            "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": PAGE_CSP})

    async def _favicon(self, _request: web.Request) -> web.Response:
        raise web.HTTPFound("/static/icon.svg")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._files[name], headers={"Content-Type": f"{STATIC[name]}; charset=utf-8"})

    async def _api_status(self, _request: web.Request) -> web.Response:
        snap = await self.snapshot()
        layers: list[object] = []
        for comp in snap.components.values():
            got = comp.get("layers")
            if isinstance(got, list):
                layers.extend(got)
        return web.json_response(status_doc(snap, config_info(self._config_path, layers)))

    async def _api_analytics(self, _request: web.Request) -> web.Response:
        return web.json_response(analytics_doc(getattr(self._rt, "analytics", None)))
