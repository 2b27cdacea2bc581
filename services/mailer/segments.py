"""Segments (SPEC §2.3): who a campaign is for. AND across dimensions, OR within one; empty = all."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.messages import Segment


@dataclass(frozen=True)
class Member:
    """What segment matching looks at of an audience member."""

    audience: str
    groups: frozenset[str]
    regions: frozenset[str]
    topics: frozenset[str]
    language: str


def _any(wanted: Iterable[str], has: frozenset[str], empty_means_all: bool) -> bool:
    wanted = set(wanted)
    if not wanted:
        return True
    # A subscriber who chose no regions (or topics) wants all of them, so every region matches.
    if empty_means_all and not has:
        return True
    return bool(wanted & has)


def matches(segment: Segment, member: Member) -> bool:
    return (
        (not segment.audiences or member.audience in segment.audiences)
        and _any(segment.groups, member.groups, empty_means_all=False)
        and _any(segment.regions, member.regions, empty_means_all=True)
        and _any(segment.topics, member.topics, empty_means_all=True)
        and (not segment.languages or member.language in segment.languages)
    )


def member(row) -> Member:
    """From an audience projection row."""
    return Member(audience=row.audience, groups=frozenset(row.groups), regions=frozenset(row.regions),
                  topics=frozenset(row.topics), language=row.language)
