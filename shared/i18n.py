"""Texts in the seven languages: one catalog per language (`locales/<lang>.toml`), German fallback."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

from shared.taxonomy import Taxonomy, load_taxonomy

LOCALES = Path(__file__).with_name("locales")


def _flatten(data: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class Translations:
    def __init__(self, taxonomy: Taxonomy, directory: Path = LOCALES) -> None:
        self.taxonomy = taxonomy
        self.catalogs: dict[str, dict[str, str]] = {}
        for lang in taxonomy.languages:
            file = directory / f"{lang}.toml"
            self.catalogs[lang] = _flatten(tomllib.loads(file.read_text("utf-8"))) if file.exists() else {}
        self.fallback = self.catalogs[taxonomy.default_language]

    def gettext(self, language: str, key: str, **values: object) -> str:
        text = self.catalogs.get(language, {}).get(key) or self.fallback.get(key)
        if text is None:
            raise KeyError(f"no text {key!r} in the catalogs")
        return text.format(**values) if values else text

    def missing(self, language: str) -> list[str]:
        return sorted(set(self.fallback) - set(self.catalogs.get(language, {})))

    def supported(self, language: str | None) -> str | None:
        if not language:
            return None
        language = language.strip().lower().replace("_", "-")
        if language in self.taxonomy.languages:
            return language
        base = language.split("-", 1)[0]
        return base if base in self.taxonomy.languages else None

    def negotiate(self, *chosen: str | None, accept_language: str | None = None) -> str:
        """The first supported explicit choice, else the best `Accept-Language` match, else German."""
        for choice in chosen:
            if lang := self.supported(choice):
                return lang
        for candidate in parse_accept_language(accept_language or ""):
            if lang := self.supported(candidate):
                return lang
        return self.taxonomy.default_language


def parse_accept_language(header: str) -> list[str]:
    """Languages of an Accept-Language header, best first (`q=0` excluded)."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(header.split(",")[:20]):
        piece = part.strip()
        if not piece:
            continue
        lang, _, params = piece.partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if q > 0 and lang.strip() != "*":
            ranked.append((-q, index, lang.strip()))
    return [lang for _, _, lang in sorted(ranked)]


@lru_cache(maxsize=2)
def load_translations() -> Translations:
    return Translations(load_taxonomy())
