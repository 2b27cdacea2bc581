"""HTTP pieces every service uses: localised templates, client IPs, health, readiness and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_to_bytes, urlencode

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, select_autoescape
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, Field
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.i18n import Translations
from shared.logs import log_context

SHARED_TEMPLATES = Path(__file__).with_name("templates")
MAX_BODY_BYTES = 64 * 1024
# Probes and scrapes: logged at DEBUG only, or they would drown everything else.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# `FastAPI(telemetry=...)` of every service: FastAPI's own OpenTelemetry off. bridgepost is observed
# through /metrics (Prometheus) and its log lines with correlation ids (docs/operations.md); with the
# default, FastAPI looked up the global OpenTelemetry providers (environment variables) for every request.
NO_OPENTELEMETRY = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
READY_CHECK_SECONDS = 5.0
METRICS_REFRESH_SECONDS = 10.0

log = logging.getLogger(__name__)
access_log = logging.getLogger("bridgepost.access")


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


class BodyTooLarge(HTTPException):
    """Raised when a body sent without Content-Length grows past the limit while it is read."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def _too_large() -> JSONResponse:
    # Connection: close, as the rest of the body is not read.
    return JSONResponse({"detail": "request body too large"}, status_code=413, headers={"Connection": "close"})


class BodyLimit:
    """Refuses request bodies over a limit without reading them all (413): at once when Content-Length
    says so, else as soon as the chunks read add up to more than the limit.

    In the second case whatever the app makes of the cut body (FastAPI: "error parsing the body", 400,
    as the error reaches it wrapped by the `http` middlewares) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await _too_large()(scope, receive, send)
            else:  # the server reads no more than Content-Length says: nothing to watch
                await self.app(scope, receive, send)
            return
        seen = 0
        too_large = started = replaced = False

        async def limited() -> dict:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = True
                    raise BodyTooLarge()
            return message

        async def watched(message: dict) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if too_large and not started:
                started = replaced = True
                await _too_large()(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except Exception:
            if not too_large or (started and not replaced):
                raise
            if not started:
                await _too_large()(scope, receive, send)


class RefuseNul:
    """Refuses a NUL character in the path (404: nothing has such a name) or the query string (422).

    No input of ours may hold one, and PostgreSQL cannot even compare a text with one: a filter or an
    id with a NUL in it would fail in the database (a 500) instead of being refused. Bodies are
    validated field by field by their models.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query: bytes = scope.get("query_string") or b""
            if "\x00" in scope.get("path", ""):
                await JSONResponse({"detail": "no such object"}, status_code=404)(scope, receive, send)
                return
            if b"%00" in query or b"\x00" in query:
                await JSONResponse({"detail": [{"loc": ["query"], "msg": "NUL characters are not allowed",
                                                "type": "string_nul"}]}, status_code=422)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ErrorBody(BaseModel):
    """An error answer of the JSON API (FastAPI's `{"detail": …}`)."""

    detail: str | dict[str, Any] | list[dict[str, Any]] = Field(description="What went wrong")


ERRORS = {
    401: "No valid staff API key (`Authorization: Bearer <key>`)",
    403: "The key's role does not allow this",
    404: "No such object (or an unknown or expired link)",
    409: "Not possible in the object's current state",
    413: "Request body too large",
    422: "Invalid input",
    429: "Too many requests; try again after `Retry-After` seconds",
}


def json_errors(*codes: int, page: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error statuses with JSON (`page`: a page route,
    whose own media type FastAPI would give a `model`, so the schema is spelled out)."""
    if page:
        content = {"application/json": {"schema": ErrorBody.model_json_schema()}}
        return {code: {"description": ERRORS[code], "content": content} for code in codes}
    return {code: {"description": ERRORS[code], "model": ErrorBody} for code in codes}


def page_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a page route that answers these statuses with a page (a message or the form
    again with what to correct). A 422 may also be JSON: `RefuseNul` refuses a NUL in the query string
    before any route is reached."""
    def content(code: int) -> dict[str, Any]:
        page = {"text/html": {"schema": {"type": "string"}}}
        return {**page, "application/json": {"schema": ErrorBody.model_json_schema()}} if code == 422 else page

    return {code: {"description": ERRORS[code] + " (a page saying so)", "content": content(code)} for code in codes}


STAFF_ERRORS = json_errors(401, 403)


def form_body(model: type[BaseModel] | None = None, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra=` documenting the urlencoded form a page route reads itself (to answer invalid
    input with the form and messages in the visitor's language instead of JSON): the model's fields
    and/or `fields` (name → JSON schema)."""
    schema = model.model_json_schema() if model else {"type": "object"}
    schema["properties"] = {**schema.get("properties", {}), **(fields or {})}
    return {"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}}}


def unprocessable(message: str, kind: str = "value_error", loc: tuple[str, ...] = ("body",)) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors (`detail`: a list of field errors)."""
    return HTTPException(422, [{"loc": list(loc), "msg": message, "type": kind}])


async def read_form(request: Request, max_fields: int) -> FormData | None:
    """The posted form, or None when it cannot be read (not UTF-8, too many fields, files, broken
    multipart): the page then answers with itself and a message in the visitor's language, not with a
    bare JSON 400 nor with mojibake taken for input."""
    try:
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            # Starlette would turn bytes that are not UTF-8 into U+FFFD (or Latin-1 letters) and go on.
            unquote_to_bytes((await request.body()).replace(b"+", b" ")).decode("utf-8")
        return await request.form(max_files=0, max_fields=max_fields)
    except UnicodeDecodeError:
        return None
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # e.g. 413 from BodyLimit
            raise
        return None


async def _unreadable_body(request: Request, exc: StarletteHTTPException) -> Response:
    # FastAPI answers a JSON body it cannot decode (not UTF-8) with a bare 400; the API's contract for
    # bad input is a 422 with field errors, like any other invalid JSON.
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeError):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": "the body is not valid UTF-8 JSON",
                                         "type": "json_invalid"}]}, status_code=422)
    return await http_exception_handler(request, exc)


UNAVAILABLE = ("Der Dienst ist gerade kurz nicht erreichbar (Datenbank). Bitte versuchen Sie es in einem Moment "
               "noch einmal. — The service is briefly unavailable (database). Please try again in a moment.")


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    # A database restart or failover: a clear 503 with Retry-After, not a 500 and a stack trace; the
    # transaction was rolled back, and the services reconnect by themselves.
    logging.getLogger("bridgepost.web").warning("database unavailable (%s): answered 503", type(exc).__name__)
    headers = {"Retry-After": "5"}
    if request.url.path.startswith("/api/") or "json" in request.headers.get("accept", ""):
        return JSONResponse({"detail": UNAVAILABLE}, status_code=503, headers=headers)
    return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>503</title><p>{UNAVAILABLE}</p>",
                        status_code=503, headers=headers)


def guard_input(app: FastAPI, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """What every service does about hostile requests: a body size limit (the largest valid request of
    the service, with room), clean errors for unreadable bodies, no NUL characters in paths and queries;
    and 503 (not 500) while the database is away."""
    from sqlalchemy import exc as sa_exc
    app.add_exception_handler(StarletteHTTPException, _unreadable_body)
    for unavailable in (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, ConnectionError):
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_middleware(RefuseNul)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)


Samples = Mapping[tuple[str, ...], float]


class Family:
    """One metric family whose samples are read when Prometheus scrapes: from `source` (live counts kept
    elsewhere, e.g. by a consumer) or from the last `set` (figures a refresh computed, e.g. from a table).
    Label sets that are gone (a finished campaign, a partition assigned elsewhere) disappear with them."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = (),
                 kind: Literal["gauge", "counter"] = "gauge", source: Callable[[], Samples] | None = None) -> None:
        self.name, self.documentation, self.labels, self.kind = name, documentation, list(labels), kind
        self.source = source
        self.samples: Samples = {}

    def set(self, samples: Samples) -> None:
        self.samples = dict(samples)

    def set_value(self, value: float) -> None:
        self.samples = {(): value}

    def _family(self) -> Metric:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return cls(self.name, self.documentation, labels=self.labels)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for labels, value in sorted((self.source() if self.source else self.samples).items()):
            family.add_metric(list(labels), value)
        return [family]


def _per_topic(consumers: Sequence[Any], count: Callable[[Any], Mapping[str, float]]) -> Samples:
    samples: dict[tuple[str, ...], float] = {}
    for consumer in consumers:
        for extra, n in count(consumer).items():
            key = (consumer.topic, *((extra,) if extra else ()))
            samples[key] = samples.get(key, 0) + n
    return samples


class Metrics:
    """Prometheus metrics of one service, in its own registry (tests run several apps per process).

    Counters of this instance: HTTP requests, Kafka messages handled / failed / dead-lettered per topic
    (`consumers`: the `shared.kafka.DeadLetters` of the service's consumers), messages the outbox relay
    published per topic (`relay`). Gauges the refresh before each scrape sets: outbox backlog, consumer
    lag; services add their own families (`family`), e.g. the mailer's delivery ledgers.
    """

    def __init__(self, service: str, consumers: Sequence[Any] = (), relay: Any = None) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.consumers = list(consumers)
        self.relay = relay
        self.requests = Counter("bridgepost_http_requests_total", "HTTP requests by method, route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("bridgepost_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)
        self.refresh_failures = Counter("bridgepost_metrics_refresh_failures_total",
                                        "Scrapes whose refresh (database, Kafka) failed; they show the last values",
                                        registry=self.registry)
        self.family("bridgepost_service_info", "The service this process runs", ["service"],
                    source=lambda: {(service,): 1})
        self.family("bridgepost_messages_consumed_total",
                    "Kafka messages handled by this instance (already-processed duplicates included)", ["topic"],
                    "counter", source=lambda: _per_topic(self.consumers, lambda c: {"": c.consumed}))
        self.family("bridgepost_messages_duplicate_total",
                    "Kafka messages this instance skipped as already processed (redelivered or replayed)",
                    ["topic"], "counter", source=lambda: _per_topic(self.consumers, lambda c: {"": c.duplicates}))
        self.family("bridgepost_messages_failed_total",
                    "Failed attempts to handle a Kafka message (reason: transient = database or broker away, "
                    "retried; error = bad data or a bug, dead-lettered after the last attempt; batch = a batch that "
                    "failed and was handled again message by message)", ["topic", "reason"],
                    "counter", source=lambda: _per_topic(
                        self.consumers, lambda c: {r: c.failed.get(r, 0) for r in ("transient", "error", "batch")}))
        self.family("bridgepost_message_batches_total",
                    "Batches of Kafka messages a batch consumer handled in one transaction each (messages "
                    "consumed ÷ this = messages per transaction)", ["topic"], "counter",
                    source=lambda: _per_topic([c for c in self.consumers if c.batch_handler],
                                              lambda c: {"": c.batches}))
        self.family("bridgepost_dlq_messages_total", "Messages this instance sent to a DLQ, by original topic",
                    ["topic"], "counter", source=lambda: _per_topic(self.consumers, lambda c: {"": c.count}))
        self.family("bridgepost_messages_published_total", "Outbox rows this instance published to Kafka",
                    ["topic"], "counter",
                    source=lambda: {(t,): n for t, n in (relay.published_by_topic.items() if relay else ())})
        self.outbox_backlog = self.family("bridgepost_outbox_backlog", "Outbox rows not yet published")
        self.outbox_oldest = self.family("bridgepost_outbox_oldest_unpublished_seconds",
                                         "Age of the oldest outbox row not yet published (0 when there is none)")
        self.consumer_lag = self.family(
            "bridgepost_consumer_lag",
            "Messages on a partition not yet handed to this instance's consumer (highwater minus position); "
            "only partitions assigned to this instance that it has fetched from", ["topic", "partition"])

    def family(self, name: str, documentation: str, labels: Sequence[str] = (),
               kind: Literal["gauge", "counter"] = "gauge", source: Callable[[], Samples] | None = None) -> Family:
        family = Family(name, documentation, labels, kind, source)
        self.registry.register(family)
        return family


class RequestLog:
    """Counts, times and logs every request (route template, not the path, as the metric label; never
    the query string, which may hold tokens or addresses), with the service as logging context.

    Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware costs a task group
    and memory streams per request, which was a quarter of a sign-up's CPU time.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless the app answers: an exception is answered 500 further out

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with log_context(service=self.metrics.service):
            try:
                await self.app(scope, receive, watched)
            finally:
                elapsed = time.perf_counter() - started
                method, route = scope["method"], getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(method, route, str(status)).inc()
                self.metrics.latency.labels(method, route).observe(elapsed)
                access_log.log(logging.DEBUG if route in PROBE_PATHS else logging.INFO,
                               "%s %s %d %.1fms", method, scope["path"], status, elapsed * 1000,
                               extra={"http": {"method": method, "route": route, "status": status,
                                               "duration_ms": round(elapsed * 1000, 1)}})


def add_operational_routes(app: FastAPI, metrics: Metrics, ready_checks: dict[str, Callable],
                           refresh: Callable[[], Awaitable[None]] | None = None) -> None:
    """/healthz, /readyz (each named check must pass) and /metrics (`refresh` updates gauges first).

    Also counts and logs every request (route template, not the path, as the metric label; never the
    query string, which may hold tokens or addresses) with the service as logging context.
    """
    app.add_middleware(RequestLog, metrics=metrics)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": metrics.service}

    not_ready: set[str] = set()

    async def check(name: str, probe: Callable[[], Awaitable[None]]) -> str:
        try:
            await asyncio.wait_for(probe(), READY_CHECK_SECONDS)
        except Exception as exc:  # noqa: BLE001 - readiness reports, it does not fail
            if name not in not_ready:  # log the cause once per outage, not at every probe
                log.warning("%s not ready: %s unavailable (%s: %s)", metrics.service, name, type(exc).__name__,
                            exc)
                not_ready.add(name)
            return f"unavailable: {type(exc).__name__}"
        if name in not_ready:
            log.info("%s: %s available again", metrics.service, name)
            not_ready.discard(name)
        return "ok"

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        names = list(ready_checks)
        outcomes = await asyncio.gather(*(check(name, ready_checks[name]) for name in names))
        results = dict(zip(names, outcomes, strict=True))
        failing = [name for name, outcome in results.items() if outcome != "ok"]
        return JSONResponse({"status": "not ready" if failing else "ready", "checks": results, "failing": failing},
                            status_code=503 if failing else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        if refresh is not None:
            try:
                await asyncio.wait_for(refresh(), METRICS_REFRESH_SECONDS)
            except Exception as exc:  # noqa: BLE001 - the counters kept in memory are still worth serving
                metrics.refresh_failures.inc()
                log.warning("metrics refresh failed, serving the last values: %s: %s", type(exc).__name__, exc)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
