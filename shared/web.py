"""HTTP pieces every service uses: localised templates, client IPs, health, readiness and metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.i18n import Translations

SHARED_TEMPLATES = Path(__file__).with_name("templates")
MAX_BODY_BYTES = 64 * 1024


def template_environment(*directories: Path) -> Environment:
    return Environment(
        loader=ChoiceLoader([FileSystemLoader(str(d)) for d in (*directories, SHARED_TEMPLATES)]),
        autoescape=select_autoescape(["html", "xml"], default_for_string=True),
        trim_blocks=True, lstrip_blocks=True,
    )


class Pages:
    """Renders server-side pages in the visitor's language, right-to-left where needed."""

    def __init__(self, env: Environment, translations: Translations, globals_: dict[str, Any]) -> None:
        self.env, self.tr = env, translations
        self.globals = globals_

    def language(self, request: Request, *chosen: str | None) -> str:
        return self.tr.negotiate(*chosen, request.query_params.get("lang"),
                                 accept_language=request.headers.get("accept-language"))

    def render(self, request: Request, name: str, language: str, status_code: int = 200,
               **context: Any) -> HTMLResponse:
        taxonomy = self.tr.taxonomy

        def _(key: str, **values: object) -> str:
            return self.tr.gettext(language, key, **values)

        html = self.env.get_template(name).render(
            _=_, lang=language, dir=taxonomy.text_direction(language), taxonomy=taxonomy,
            language_links=[(code, taxonomy.language_names.get(code, code),
                             "?" + urlencode({**request.query_params, "lang": code}))
                            for code in taxonomy.languages],
            **self.globals, **context)
        return HTMLResponse(html, status_code=status_code, headers={
            "Content-Language": language, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                       "frame-ancestors 'none'; base-uri 'none'",
        })


def client_ip(request: Request, trust_forwarded_for: bool) -> str | None:
    if trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for", "")
        # The proxy appends the address it saw last; earlier entries are the client's own claims.
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return request.client.host if request.client else None


class BodyLimit:
    """Refuses request bodies over a limit without reading them all (413)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await PlainTextResponse("request body too large", status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ValueError("request body too large")
            return message

        await self.app(scope, limited, send)


class Metrics:
    """Prometheus metrics of one service, in its own registry (tests run several apps per process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("bridgepost_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("bridgepost_http_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.consumed = Gauge("bridgepost_messages_consumed_total", "Kafka messages handled by this instance",
                              ["topic"], registry=self.registry)
        self.dlq = Gauge("bridgepost_dlq_messages_total", "Messages this instance sent to a DLQ", ["topic"],
                         registry=self.registry)
        self.outbox_backlog = Gauge("bridgepost_outbox_backlog", "Outbox rows not yet published",
                                    registry=self.registry)
        self.published = Gauge("bridgepost_outbox_published", "Outbox rows published by this instance",
                               registry=self.registry)
        self.service = service


def add_operational_routes(app: FastAPI, metrics: Metrics, ready_checks: dict[str, Callable],
                           refresh: Callable[[], Awaitable[None]] | None = None) -> None:
    """/healthz, /readyz (each named check must pass) and /metrics (`refresh` updates gauges first)."""
    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - started)
        return response

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": metrics.service}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        results: dict[str, str] = {}
        for name, check in ready_checks.items():
            try:
                await check()
                results[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - readiness reports, it does not fail
                results[name] = f"unavailable: {type(exc).__name__}"
        ok = all(v == "ok" for v in results.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": results},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        if refresh is not None:
            await refresh()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
