"""Staff API of the mailer (campaigns arrive with their own issue): delivery statistics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from services.mailer import store
from shared.auth import Staff, require_role

router = APIRouter(prefix="/api/v1")
Editor = Annotated[Staff, Depends(require_role("editor"))]


class DeliveryStats(BaseModel):
    by_status: dict[str, int]
    by_kind: dict[str, dict[str, int]]


@router.get("/deliveries/stats", response_model=DeliveryStats, tags=["staff"])
async def delivery_stats(request: Request, staff: Editor) -> DeliveryStats:
    """Counts of transactional mails by state (pending, sending, sent, retry, failed, ambiguous, cancelled)."""
    m = store.outgoing_mail
    async with request.app.state.db.sessions() as s:
        rows = (await s.execute(select(m.c.kind, m.c.status, func.count()).group_by(m.c.kind, m.c.status))).all()
    by_status: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, count in rows:
        by_status[status] = by_status.get(status, 0) + count
        by_kind.setdefault(kind, {})[status] = count
    return DeliveryStats(by_status=by_status, by_kind=by_kind)
