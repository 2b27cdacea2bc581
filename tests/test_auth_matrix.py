"""The staff authentication matrix: every staff endpoint of every service, found from the apps' routes (the
`require_role` dependency says which role each needs), against no key, malformed keys, a revoked key and
each role: 401 without a valid key, 403 exactly where the role is too low, neither where it suffices."""

from __future__ import annotations

import typing
import uuid

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from services.events import store as events_store
from services.mailer import store as mailer_store
from services.subscriptions import store as subscriptions_store
from shared.auth import ROLES, register_key, revoke_key, staff_routes
from tests.conftest import ADMIN_KEY, EDITOR_KEY, PUBLISHER_KEY, Stack

KEYS = {"editor": EDITOR_KEY, "publisher": PUBLISHER_KEY, "admin": ADMIN_KEY}
SERVICES = ["subscriptions", "events", "mailer"]


def _service(stack: Stack, name: str) -> tuple[FastAPI, httpx.AsyncClient, typing.Any]:
    return {"subscriptions": (stack.sub_app, stack.subscriptions, subscriptions_store.infra),
            "events": (stack.events_app, stack.events, events_store.infra),
            "mailer": (stack.mail_app, stack.mailer, mailer_store.infra)}[name]


def _url(route: APIRoute) -> str:
    """The route's path with its parameters filled in: an allowed value where there is a choice (`{action}`),
    else an id nothing has. With a sufficient role the request then ends in the handler (404, 422),
    harmlessly; what matters here is that it got past the key check."""
    values = {}
    for param in route.dependant.path_params:
        choices = typing.get_args(param.field_info.annotation)
        values[param.name] = choices[0] if choices else f"no-such-{param.name}-{uuid.uuid4().hex[:8]}"
    return route.path.format(**values)


def _requests(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, url, required role) for every staff endpoint of `app`."""
    return [(method, _url(route), role) for route, role in staff_routes(app) for method in sorted(route.methods)]


@pytest.mark.parametrize("service", SERVICES)
def test_staff_endpoints_are_found_and_documented(stack: Stack, service: str) -> None:
    """The routes found by their dependency are the operations OpenAPI marks as secured, with the same role
    (the requirement's scope) and 401 and 403 documented; every staff API path is under /api/v1/."""
    app, _client, _infra = _service(stack, service)
    found = {(m, route.path): role for route, role in staff_routes(app) for m in route.methods}
    assert len(found) >= 5, found
    secured = {}
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            if operation.get("security"):
                (requirement,) = operation["security"]
                (secured[(method.upper(), path)],) = requirement["HTTPBearer"]
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
    assert found == secured
    assert all(path.startswith("/api/v1/") for _m, path in found)


@pytest.mark.parametrize("service", SERVICES)
async def test_every_staff_endpoint_checks_key_and_role(stack: Stack, service: str) -> None:
    app, client, infra = _service(stack, service)
    revoked = f"test-revoked-{uuid.uuid4().hex}"
    key_id = await register_key(app.state.db, infra, revoked, "admin", "former colleague")
    assert await revoke_key(app.state.db, infra, key_id) == 1
    refused = {
        "no key": {},
        "unknown key": {"Authorization": "Bearer bp_" + uuid.uuid4().hex},
        "altered key": {"Authorization": f"Bearer {ADMIN_KEY}x"},
        "empty bearer": {"Authorization": "Bearer "},
        "no scheme": {"Authorization": ADMIN_KEY},
        "basic scheme": {"Authorization": f"Basic {ADMIN_KEY}"},
        "token scheme": {"Authorization": f"Token {ADMIN_KEY}"},
        "revoked key": {"Authorization": f"Bearer {revoked}"},
    }
    requests = _requests(app)
    assert requests
    outcomes: list[str] = []
    for method, url, required in requests:
        body = {} if method in ("POST", "PUT", "PATCH") else None
        for label, headers in refused.items():
            r = await client.request(method, url, json=body, headers=headers)
            if r.status_code != 401 or r.headers.get("www-authenticate") != "Bearer":
                outcomes.append(f"{method} {url} with {label}: {r.status_code} {r.text[:100]}")
        for role, key in KEYS.items():
            r = await client.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"})
            too_low = ROLES.index(role) < ROLES.index(required)
            if too_low and r.status_code != 403:
                outcomes.append(f"{method} {url} ({required}) as {role}: {r.status_code}, expected 403")
            if not too_low and r.status_code in (401, 403):
                outcomes.append(f"{method} {url} ({required}) as {role}: {r.status_code} {r.text[:100]}")
        # The scheme's name is case-insensitive (RFC 9110): a lower-case "bearer" with the right key is fine.
        r = await client.request(method, url, json=body, headers={"Authorization": f"bearer {ADMIN_KEY}"})
        if r.status_code in (401, 403):
            outcomes.append(f"{method} {url} with a lower-case scheme: {r.status_code}")
    assert not outcomes, "\n".join(outcomes)
    roles = {required for _m, _u, required in requests}
    print(f"\n{service}: {len(requests)} staff endpoints, roles {sorted(roles, key=ROLES.index)}")


def test_the_roles_the_services_require() -> None:
    """The roles found on the routes are the ones SPEC §3 gives: editors write drafts, publishers publish
    and send (and see event guests), admins see subscribers' personal data."""
    from services.events.api import router as events_router
    from services.mailer.api import router as mailer_router
    from services.subscriptions.api import router as subscriptions_router

    app = FastAPI()
    for router in (subscriptions_router, events_router, mailer_router):
        app.include_router(router)
    needs = {(sorted(route.methods)[0], route.path): role for route, role in staff_routes(app)}
    personal = [role for (_m, path), role in needs.items() if "/subscribers" in path or "/suppressions" in path]
    assert len(personal) >= 6 and set(personal) == {"admin"}
    assert needs[("POST", "/api/v1/events")] == "editor" and needs[("POST", "/api/v1/campaigns")] == "editor"
    assert needs[("POST", "/api/v1/events/{event_id}/publish")] == "publisher"
    assert needs[("POST", "/api/v1/campaigns/{campaign_id}/send")] == "publisher"
    assert needs[("GET", "/api/v1/events/{event_id}/registrations")] == "publisher"  # personal data of guests
