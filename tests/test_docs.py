"""The configuration reference names every setting of every service."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.events.settings import EventsSettings
from services.mailer.settings import MailerSettings
from services.subscriptions.settings import SubscriptionsSettings
from tests.test_compose import env_names

DOC = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text("utf-8")


@pytest.mark.parametrize("settings", [SubscriptionsSettings, EventsSettings, MailerSettings])
def test_every_setting_is_documented(settings) -> None:
    missing = sorted(name for name in env_names(settings)
                     if name.isupper() and f"`{name}`" not in DOC)
    assert not missing, f"docs/configuration.md lacks {missing}"
