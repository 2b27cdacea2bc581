"""docker-compose.yml and the Dockerfile agree with the code: CLI commands, setting names, ports.

No Docker is needed: the files are parsed and compared with `shared.cli.parser()` and the settings
classes, so a renamed setting or command fails here instead of silently in production.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.events.settings import EventsSettings
from services.mailer.settings import MailerSettings
from services.subscriptions.settings import SubscriptionsSettings
from shared import cli

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
POSTGRES_INIT = ROOT / "deploy" / "postgres-init.sql"

SETTINGS: dict[str, type[BaseSettings]] = {"subscriptions": SubscriptionsSettings, "events": EventsSettings,
                                           "mailer": MailerSettings}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED = re.compile(r"^\$\{\w+:\?[^}]+\}$")


def env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variable names a settings class reads."""
    prefix = cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


ACCEPTED = set().union(*(env_names(cls) for cls in SETTINGS.values()))


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def is_bridgepost(svc: dict[str, Any]) -> bool:
    return "build" in svc or str(svc.get("image", "")).split(":")[0].endswith("bridgepost")


BRIDGEPOST = {name: svc for name, svc in SERVICES.items() if is_bridgepost(svc)}


def served(svc: dict[str, Any]) -> str | None:
    """The service name of a `bridgepost serve <service>` command, else None."""
    argv = command(svc)
    return argv[2] if argv[1:2] == ["serve"] and len(argv) > 2 else None


def interpolate(value: str) -> str:
    """What compose would pass, with every required variable set to a dummy value."""
    def replace(m: re.Match[str]) -> str:
        op, arg = m.group("op"), m.group("arg")
        if op in (":-", "-"):
            return arg
        return f"dummy-{m.group('name').lower().replace('_', '-')}"
    return INTERPOLATION.sub(replace, value.replace("$$", "$"))


def container_port(spec: Any) -> int:
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


# --- the rule used to compute setting names ----------------------------------------------------------


def test_env_name_rule_matches_pydantic_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ACCEPTED | {"MAILER_SMTP_HOST"}:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SMTP_HOST", "relay.example.org")
    monkeypatch.setenv("MAILER_SMTP_HOST", "ignored.example.org")  # shared names take no prefix
    monkeypatch.setenv("MAIL_REPLY_TO", "reply@example.org")  # field reply_to
    monkeypatch.setenv("MAILER_PORT", "9003")
    monkeypatch.setenv("SUBSCRIPTIONS_CONFIRM_TOKEN_HOURS", "12")
    monkeypatch.setenv("BRIDGEPOST_ENV", "test")
    mailer, subscriptions = MailerSettings(), SubscriptionsSettings()
    assert (mailer.smtp_host, mailer.reply_to, mailer.port) == ("relay.example.org", "reply@example.org", 9003)
    assert subscriptions.confirm_token_hours == 12
    assert mailer.environment == subscriptions.environment == "test"
    assert {"SMTP_HOST", "MAIL_REPLY_TO", "MAILER_DATABASE_URL", "SUBSCRIPTIONS_SECRET_KEY"} <= ACCEPTED
    assert "MAILER_SMTP_HOST" not in ACCEPTED and "MAILER_REPLY_TO" not in ACCEPTED


# --- docker-compose.yml ----------------------------------------------------------------------------


def test_every_cli_service_is_served_by_compose() -> None:
    assert {"migrate", "subscriptions", "mailer"} <= set(BRIDGEPOST)
    assert {served(svc) for svc in BRIDGEPOST.values()} - {None} == set(cli.SERVICES)


@pytest.mark.parametrize("name", sorted(BRIDGEPOST))
def test_command_exists_in_cli(name: str) -> None:
    argv = command(BRIDGEPOST[name])
    assert argv[:1] == ["bridgepost"], f"{name}: command must start with the console script: {argv}"
    commands = subparsers(cli.parser())
    assert argv[1] in commands, f"{name}: no `bridgepost {argv[1]}` (have {sorted(commands)})"
    if argv[1] == "serve":
        service = next(a for a in commands["serve"]._actions if a.dest == "service")
        assert argv[2] in service.choices, f"{name}: serve {argv[2]!r} is not one of {service.choices}"
    try:
        cli.parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse rejected an option or argument
        pytest.fail(f"{name}: `{' '.join(argv)}` does not parse: exit {exc.code}")


@pytest.mark.parametrize("name", sorted(BRIDGEPOST))
def test_environment_names_are_real_settings(name: str) -> None:
    env = environment(BRIDGEPOST[name])
    assert env, f"{name}: no environment"
    unknown = sorted(set(env) - ACCEPTED)
    assert not unknown, f"{name}: not a setting of any service: {unknown}"
    service = served(BRIDGEPOST[name])
    if service:  # a served service gets only its own settings, not another service's
        foreign = sorted(set(env) - env_names(SETTINGS[service]))
        assert not foreign, f"{name}: not a setting of {service}: {foreign}"


def test_commented_relay_settings_are_real_settings() -> None:
    commented = re.findall(r"^\s*#\s*([A-Z][A-Z0-9_]*):", COMPOSE_FILE.read_text(encoding="utf-8"), re.M)
    assert {"SMTP_HOST", "SMTP_PORT", "SMTP_TLS", "SMTP_USERNAME", "SMTP_PASSWORD"} <= set(commented)
    assert not sorted(set(commented) - env_names(MailerSettings))


@pytest.mark.parametrize("name", sorted(BRIDGEPOST))
def test_environment_builds_production_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ACCEPTED:
        monkeypatch.delenv(var, raising=False)
    for var, value in environment(BRIDGEPOST[name]).items():
        monkeypatch.setenv(var, interpolate(value))
    service = served(BRIDGEPOST[name])
    # `bridgepost migrate` and `api-key` build every service's settings.
    for cls in [SETTINGS[service]] if service else SETTINGS.values():
        settings = cls()  # raises on a bad value, or on the built-in secret in production
        assert settings.environment == "production"
        assert settings.kafka_enable_idempotence is True
        assert settings.database_url.startswith("postgresql+asyncpg://"), settings.database_url


@pytest.mark.parametrize("name", sorted(BRIDGEPOST))
def test_secrets_are_required_from_the_environment(name: str) -> None:
    env = environment(BRIDGEPOST[name])
    for var, value in env.items():
        if var.endswith(("_SECRET_KEY", "_PASSWORD")):
            assert REQUIRED.match(value), f"{name}: {var} must come from ${{{var}:?...}}, not {value!r}"
        if var.endswith("_DATABASE_URL"):
            assert "${POSTGRES_PASSWORD:?" in value, f"{name}: {var} must not hold a literal password"
    assert env.get("BRIDGEPOST_ENV") == "production"


def test_databases_exist_in_postgres_init() -> None:
    sql = re.sub(r"--[^\n]*", "", POSTGRES_INIT.read_text(encoding="utf-8"))
    created = set(re.findall(r"^\s*CREATE DATABASE\s+(\w+)\s*;", sql, re.I | re.M))
    assert created == set(SETTINGS)
    mounts = [str(v) for v in SERVICES["postgres"].get("volumes", [])]
    assert any(v.startswith("./deploy/postgres-init.sql:/docker-entrypoint-initdb.d/") for v in mounts), mounts
    for name, svc in BRIDGEPOST.items():
        for var, value in environment(svc).items():
            if var.endswith("_DATABASE_URL"):
                database = interpolate(value).rsplit("/", 1)[-1]
                assert database in created, f"{name}: {var} names database {database!r}, not created"
                assert database == var.removesuffix("_DATABASE_URL").lower(), f"{name}: {var} → {database}"


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_ports_and_healthcheck_match_settings(service: str) -> None:
    name, svc = next((n, s) for n, s in BRIDGEPOST.items() if served(s) == service)
    port = SETTINGS[service].model_fields["port"].default
    argv = command(svc)
    if "--port" in argv:
        assert int(argv[argv.index("--port") + 1]) == port
    published = [container_port(spec) for spec in svc.get("ports", [])]
    assert published == [port], f"{name}: publishes {published}, settings port is {port}"
    test = " ".join(str(part) for part in svc["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/healthz" in test, test
    assert "urllib.request" in test


def test_services_wait_for_migrations() -> None:
    for name, svc in BRIDGEPOST.items():
        if served(svc):
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert command(SERVICES["migrate"])[1] == "migrate"
    assert SERVICES["migrate"].get("restart") == "no"


def test_depends_on_targets_exist() -> None:
    for name, svc in SERVICES.items():
        targets = svc.get("depends_on") or []
        for target in targets:
            assert target in SERVICES, f"{name} depends on unknown service {target!r}"


def test_kafka_runs_in_kraft_mode() -> None:
    kafka = SERVICES["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = environment(kafka)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    bootstrap = {environment(svc).get("KAFKA_BOOTSTRAP_SERVERS") for svc in BRIDGEPOST.values()}
    assert bootstrap == {env["KAFKA_ADVERTISED_LISTENERS"].split("://", 1)[1]}


# --- Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_user() -> None:
    assert DOCKERFILE.is_file()
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    users = [line.split(None, 1)[1].strip() for line in lines if line.upper().startswith("USER ")]
    assert users, "Dockerfile has no USER line"
    user = users[-1].split(":")[0]  # the last USER is the one the container runs as
    assert user not in ("root", "0"), f"runs as {users[-1]!r}"


def test_dockerfile_installs_the_package() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    copied = " ".join(re.findall(r"^COPY\s+(.+)$", text, re.M))
    for source in ("pyproject.toml", "README.md", "shared/", "services/"):
        assert source in copied, f"Dockerfile does not copy {source}"
        assert (ROOT / source).exists()
    assert re.search(r"pip install \.(\s|$)", text)
    assert re.search(r'^CMD \["bridgepost", "--help"\]', text, re.M)
