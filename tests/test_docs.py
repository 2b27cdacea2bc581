"""The docs generated from the code are committed and current, and they are complete.

`make docs` (shared/apidocs.py) writes docs/api/asyncapi.json, docs/api/openapi-<service>.json and
docs/configuration.md. These tests regenerate them in memory and compare with the committed files.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from services.events.settings import EventsSettings
from services.mailer.settings import MailerSettings
from services.subscriptions.settings import SubscriptionsSettings
from shared import apidocs, topics
from tests.test_compose import env_names

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def generated() -> dict[str, str]:
    return apidocs.generate()


@pytest.fixture(scope="module")
def asyncapi(generated: dict[str, str]) -> dict[str, Any]:
    return json.loads(generated[apidocs.ASYNCAPI_FILE])


@pytest.mark.parametrize("path", apidocs.OUTPUTS)
def test_committed_file_is_what_the_code_generates(generated: dict[str, str], path: str) -> None:
    committed = ROOT / path
    assert committed.is_file(), f"{path} is missing: run `make docs` and commit it"
    assert committed.read_text("utf-8") == generated[path], \
        f"{path} is out of date with the code: run `make docs` and commit the result"


def test_generation_is_deterministic(generated: dict[str, str]) -> None:
    assert apidocs.generate() == generated


@pytest.mark.parametrize("settings", [SubscriptionsSettings, EventsSettings, MailerSettings])
def test_every_setting_is_documented(settings: type[BaseSettings]) -> None:
    doc = (ROOT / apidocs.CONFIGURATION_FILE).read_text("utf-8")
    missing = sorted(name for name in env_names(settings)
                     if name.isupper() and f"`{name}`" not in doc)
    assert not missing, f"docs/configuration.md lacks {missing}: run `make docs`"


def test_every_setting_has_a_description() -> None:
    missing = apidocs.undocumented_settings()
    assert not missing, f"give these settings a Field(description=...) (then run `make docs`): {missing}"


def _members(union: Any) -> set[str]:
    """Class names of a (possibly Annotated) union of message models."""
    inner = typing.get_args(union)[0] if typing.get_origin(union) is typing.Annotated else union
    return {cls.__name__ for cls in (typing.get_args(inner) or (inner,))}


def _payload_models(doc: dict[str, Any], channel: dict[str, Any]) -> set[str]:
    schemas, names = doc["components"]["schemas"], set()
    for ref in channel["messages"].values():
        message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
        payload = schemas[message["payload"]["$ref"].rsplit("/", 1)[1]]
        for option in payload.get("oneOf", [message["payload"]]):
            names.add(option["$ref"].rsplit("/", 1)[1])
    return names


@pytest.mark.parametrize("topic", sorted(topics.PARTITIONS))
def test_asyncapi_describes_every_topic_with_its_messages(asyncapi: dict[str, Any], topic: str) -> None:
    doc = apidocs.TOPICS[topic]
    expected = _members(doc.payload)
    channels = {key: c for key, c in asyncapi["channels"].items() if c["address"] == topic}
    actions = {asyncapi["operations"][key]["action"] for key in channels}
    assert actions == {"send", "receive"}, f"{topic}: published and consumed, got {actions}"
    for key, channel in channels.items():
        assert _payload_models(asyncapi, channel) == expected, key
        assert channel["bindings"]["kafka"]["partitions"] == topics.PARTITIONS[topic]
        for model in expected:
            assert asyncapi["components"]["schemas"][model]["properties"]["type"]["const"]
    assert any(c["address"] == topics.dlq(topic) for c in asyncapi["channels"].values()), f"{topic}.dlq"


def test_asyncapi_consumers_are_the_services_real_consumers(asyncapi: dict[str, Any]) -> None:
    documented = sorted(
        (asyncapi["channels"][op["channel"]["$ref"].rsplit("/", 1)[1]]["address"],
         op["bindings"]["kafka"]["groupId"]["enum"][0])
        for op in asyncapi["operations"].values() if op["action"] == "receive")
    real = sorted(pair for service in apidocs.SERVICES for pair in apidocs.consumed(apidocs.build_app(service)))
    assert documented == real
    assert ("events.registration.v1", "subscriptions.events.registration.v1") in real


@pytest.mark.parametrize("service", apidocs.SERVICES)
def test_documented_producers_match_the_code(service: str) -> None:
    """Services publish through their outbox with `topics.<NAME>`; handlers.py only consumes."""
    constants = {name: getattr(topics, name) for name in dir(topics) if name.isupper() and
                 isinstance(getattr(topics, name), str) and getattr(topics, name) in topics.PARTITIONS}
    used = set()
    for source in (ROOT / "services" / service).glob("*.py"):
        if source.name != "handlers.py":
            used.update(constants[n] for n in re.findall(r"\btopics\.([A-Z_]+)\b", source.read_text("utf-8"))
                        if n in constants)
    documented = {topic for topic, doc in apidocs.TOPICS.items() if doc.producer == service}
    assert used == documented, f"shared/apidocs.py TOPICS says {service} publishes {documented}, code: {used}"


@pytest.mark.parametrize("service", apidocs.SERVICES)
def test_openapi_has_the_staff_api(generated: dict[str, str], service: str) -> None:
    document = json.loads(generated[apidocs.openapi_file(service)])
    assert document["info"]["title"] == f"bridgepost {service}"
    assert any(path.startswith("/api/v1/") for path in document["paths"])


def _source_files() -> list[Path]:
    return [path for folder in ("shared", "services") for path in (ROOT / folder).rglob("*.py")
            if "migrations" not in path.parts]


def test_operations_explains_every_metric() -> None:
    """Every Prometheus metric the code registers is explained in docs/operations.md."""
    registered = re.compile(r"""(?:family|Counter|Gauge|Histogram|Summary)\(\s*["'](bridgepost_\w+)["']""")
    names = {name for path in _source_files() for name in registered.findall(path.read_text("utf-8"))}
    assert "bridgepost_outbox_backlog" in names  # the pattern still finds them
    doc = (ROOT / "docs" / "operations.md").read_text("utf-8")
    missing = sorted(name for name in names if f"`{name}`" not in doc)
    assert not missing, f"docs/operations.md does not explain the metrics {missing}"


def test_architecture_names_every_topic_and_consumer_group() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text("utf-8")
    groups = {group for service in apidocs.SERVICES for _, group in apidocs.consumed(apidocs.build_app(service))}
    missing = sorted(name for name in (*topics.PARTITIONS, *groups) if name not in doc)
    assert not missing, f"docs/architecture.md does not mention {missing}"


def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    docs = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").rglob("*")
                  if path.is_file() and path.suffix in (".md", ".json"))
    missing = [doc for doc in docs if f"]({doc})" not in readme]
    assert not missing, f"README.md does not link {missing}"
