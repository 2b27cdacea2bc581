"""The taxonomy (languages, regions, topics, partner groups, event kinds) loaded from one data file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_FILE = Path(__file__).with_name("taxonomy.toml")
DIMENSIONS = ("regions", "topics", "groups", "event_kinds")


@dataclass(frozen=True)
class Taxonomy:
    languages: tuple[str, ...]
    default_language: str
    rtl_languages: frozenset[str]
    language_names: dict[str, str]
    labels: dict[str, dict[str, dict[str, str]]]  # dimension -> key -> language -> label

    def keys(self, dimension: str) -> tuple[str, ...]:
        return tuple(self.labels[dimension])

    def label(self, dimension: str, key: str, language: str) -> str:
        """The label in `language`, falling back to the default language, then to the key itself."""
        by_language = self.labels[dimension].get(key, {})
        return by_language.get(language) or by_language.get(self.default_language) or key

    def options(self, dimension: str, language: str) -> list[tuple[str, str]]:
        return [(key, self.label(dimension, key, language)) for key in self.labels[dimension]]

    def is_rtl(self, language: str) -> bool:
        return language in self.rtl_languages

    def text_direction(self, language: str) -> str:
        return "rtl" if self.is_rtl(language) else "ltr"

    def missing_labels(self) -> list[tuple[str, str, str]]:
        """(dimension, key, language) for every label that falls back to the default language."""
        return [
            (dim, key, lang)
            for dim in DIMENSIONS
            for key, by_language in self.labels[dim].items()
            for lang in self.languages
            if not by_language.get(lang)
        ]


def parse_taxonomy(data: dict) -> Taxonomy:
    languages = tuple(data["languages"])
    default = data.get("default_language", languages[0])
    if default not in languages:
        raise ValueError(f"default_language {default!r} is not one of the languages")
    return Taxonomy(
        languages=languages,
        default_language=default,
        rtl_languages=frozenset(data.get("rtl_languages", [])),
        language_names=dict(data.get("language_names", {})),
        labels={dim: {k: dict(v) for k, v in data.get(dim, {}).items()} for dim in DIMENSIONS},
    )


@lru_cache(maxsize=4)
def load_taxonomy(path: str | None = None) -> Taxonomy:
    """The taxonomy from BRIDGEPOST_TAXONOMY_FILE, or the file shipped with the project."""
    file = Path(path or os.environ.get("BRIDGEPOST_TAXONOMY_FILE") or DEFAULT_FILE)
    with file.open("rb") as f:
        return parse_taxonomy(tomllib.load(f))
