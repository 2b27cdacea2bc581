"""Validation of segments given by staff (SPEC §2.3): every key must exist in the taxonomy."""

from __future__ import annotations

from pydantic import field_validator
from pydantic_core import PydanticCustomError

from shared.messages import Segment
from shared.taxonomy import load_taxonomy


def known(dimension: str, values: list[str], code: str) -> list[str]:
    keys = set(load_taxonomy().keys(dimension))
    for value in values:
        if value not in keys:
            raise PydanticCustomError(code, "unknown key {value!r}", {"value": value[:50]})
    return list(dict.fromkeys(values))


class SegmentIn(Segment):
    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return known("groups", v, "unknown_group")

    @field_validator("regions")
    @classmethod
    def _regions(cls, v: list[str]) -> list[str]:
        return known("regions", v, "unknown_region")

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        return known("topics", v, "unknown_topic")

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: list[str]) -> list[str]:
        languages = load_taxonomy().languages
        for lang in v:
            if lang not in languages:
                raise PydanticCustomError("unknown_language", "unknown language {value!r}", {"value": lang[:20]})
        return list(dict.fromkeys(v))
