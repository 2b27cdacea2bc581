"""Staff API: authentication and roles on every endpoint, partner groups, GDPR export and erasure."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.mailer import store as mailer_store
from services.subscriptions import store
from shared.auth import register_key, revoke_key
from tests.conftest import ADMIN_KEY, EDITOR_KEY, PUBLISHER_KEY, Stack

SUBSCRIBER_ENDPOINTS = [
    ("GET", "/api/v1/subscribers", None),
    ("GET", "/api/v1/subscribers/{id}", None),
    ("PATCH", "/api/v1/subscribers/{id}", {"groups": ["wirtschaft"]}),
    ("GET", "/api/v1/subscribers/{id}/export", None),
    ("GET", "/api/v1/suppressions/count", None),
    ("DELETE", "/api/v1/subscribers/{id}", None),  # last: it erases
]


async def _active(stack: Stack, tag: str) -> tuple[str, str]:
    addr = stack.address(tag)
    await stack.signup(addr, regions=["stendal"], topics=["arbeitsmarkt"])
    await stack.confirm(addr)
    await stack.smtp.wait_for(addr, 2)
    return addr, (await stack.subscriber(addr))["id"]


async def test_every_staff_endpoint_refuses_missing_wrong_and_revoked_keys(stack: Stack) -> None:
    _addr, sid = await _active(stack, "auth")
    revoked = "test-revoked-key-0123456789"
    await register_key(stack.sub_app.state.db, store.infra, revoked, "admin", "leaver")
    await revoke_key(stack.sub_app.state.db, store.infra, (await _key_id(stack, revoked)))
    for method, path, body in SUBSCRIBER_ENDPOINTS:
        url = path.format(id=sid)
        for headers, expected in (({}, 401), ({"Authorization": "Bearer nope"}, 401),
                                  ({"Authorization": f"Bearer {revoked}"}, 401),
                                  ({"Authorization": "Basic abc"}, 401),
                                  (stack.staff(EDITOR_KEY), 403), (stack.staff(PUBLISHER_KEY), 403)):
            r = await stack.subscriptions.request(method, url, json=body, headers=headers)
            assert r.status_code == expected, (method, url, headers, r.text)
        r = await stack.subscriptions.request(method, url, json=body, headers=stack.staff(ADMIN_KEY))
        assert r.status_code == 200, (method, url, r.text)
    # the mailer's staff API: editors may read delivery statistics
    assert (await stack.mailer.get("/api/v1/deliveries/stats")).status_code == 401
    stats = await stack.mailer.get("/api/v1/deliveries/stats", headers=stack.staff(EDITOR_KEY))
    assert stats.status_code == 200 and stats.json()["by_status"].get("sent", 0) >= 2
    async with stack.sub_app.state.db.sessions() as s:
        actions = (await s.scalars(select(store.infra.audit_log.c.action)
                                   .where(store.infra.audit_log.c.target == sid))).all()
    assert {"subscriber.groups", "subscriber.export", "subscriber.erase"} <= set(actions)


async def _key_id(stack: Stack, key: str) -> str:
    from shared.auth import hash_key
    async with stack.sub_app.state.db.sessions() as s:
        return await s.scalar(select(store.infra.api_keys.c.id).where(store.infra.api_keys.c.key_hash == hash_key(key)))


async def test_partner_groups_are_set_by_staff_and_reach_the_mailer(stack: Stack) -> None:
    addr, sid = await _active(stack, "partner")
    r = await stack.subscriptions.patch(f"/api/v1/subscribers/{sid}", json={"groups": ["wirtschaft", "medien"]},
                                        headers=stack.staff())
    assert r.status_code == 200 and r.json()["groups"] == ["wirtschaft", "medien"] and r.json()["audience"] == "partner"
    bad = await stack.subscriptions.patch(f"/api/v1/subscribers/{sid}", json={"groups": ["freunde"]},
                                          headers=stack.staff())
    assert bad.status_code == 422
    listed = await stack.subscriptions.get("/api/v1/subscribers", params={"group": "medien", "region": "stendal"},
                                           headers=stack.staff())
    assert sid in [s["id"] for s in listed.json()["items"]]

    async def projected():
        async with stack.mail_app.state.db.sessions() as s:
            row = (await s.execute(select(mailer_store.audience)
                                   .where(mailer_store.audience.c.subscriber_id == sid))).first()
        return row is not None and row.groups == ["wirtschaft", "medien"] and row.audience == "partner"

    await stack.until(projected, what="groups in the mailer's audience projection")
    assert (await stack.subscriptions.get("/api/v1/subscribers", params={"status": "nonsense"},
                                          headers=stack.staff())).status_code == 422


async def test_gdpr_export_and_erasure(stack: Stack) -> None:
    addr, sid = await _active(stack, "gdpr")
    export = await stack.subscriptions.get(f"/api/v1/subscribers/{sid}/export", headers=stack.staff())
    assert export.status_code == 200
    body = export.json()
    assert body["subscriber"]["email"] == addr and body["subscriber"]["regions"] == ["stendal"]
    assert [e["action"] for e in body["consent_log"]] == ["requested", "confirmed"]
    assert body["consent_log"][0]["consent_text"]

    erased = await stack.subscriptions.delete(f"/api/v1/subscribers/{sid}", headers=stack.staff())
    assert erased.status_code == 200
    after = (await stack.subscriptions.get(f"/api/v1/subscribers/{sid}", headers=stack.staff())).json()
    assert after["status"] == "erased" and after["email"] is None and after["name"] is None
    log = (await stack.subscriptions.get(f"/api/v1/subscribers/{sid}/export", headers=stack.staff())).json()
    assert all(e["ip"] is None and e["user_agent"] is None for e in log["consent_log"])
    listed = await stack.subscriptions.get("/api/v1/subscribers", params={"email": addr}, headers=stack.staff())
    assert listed.json()["total"] == 0

    async def forgotten_by_mailer():
        async with stack.mail_app.state.db.sessions() as s:
            projected = await s.scalar(select(mailer_store.audience.c.email)
                                       .where(mailer_store.audience.c.subscriber_id == sid))
            recipients = (await s.scalars(select(mailer_store.outgoing_mail.c.recipient)
                                          .where(mailer_store.outgoing_mail.c.subscriber_id == sid))).all()
        return projected is None and recipients and all(r is None for r in recipients)

    await stack.until(forgotten_by_mailer, what="the mailer to erase its copy")

    # An erased address is never mailed again, even when someone signs it up.
    assert (await stack.signup(addr)).status_code == 202
    canary = stack.address("canary")
    await stack.signup(canary)
    await stack.smtp.wait_for(canary)
    assert len(stack.smtp.to(addr)) == 2
    again = await stack.subscriptions.delete(f"/api/v1/subscribers/{sid}", headers=stack.staff())
    assert again.status_code == 200
    assert (await stack.subscriptions.delete("/api/v1/subscribers/nope", headers=stack.staff())).status_code == 404


@pytest.mark.parametrize("role", ["editor", "publisher", "admin"])
def test_roles_nest(role: str) -> None:
    from shared.auth import ROLES, Staff
    staff = Staff("id", "name", role)
    assert [staff.may(r) for r in ROLES] == [ROLES.index(role) >= i for i in range(len(ROLES))]
