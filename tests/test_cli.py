"""The `bridgepost` console script (SPEC §4), run as a subprocess against throw-away SQLite databases."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.cli import SERVICES

BRIDGEPOST = Path(sys.executable).with_name("bridgepost")
SUBCOMMANDS = ["dev", "serve", "migrate", "api-key", "inbox"]
KEY_ACTIONS = ["create", "list", "revoke"]
# Variables from the surroundings that could point the CLI at another database or broker.
LEAKY_PREFIXES = ("SUBSCRIPTIONS_", "MAILER_", "BRIDGEPOST_", "KAFKA_", "SMTP_", "DEV_ADMIN")


@dataclass(frozen=True)
class Cli:
    tmp: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BRIDGEPOST), *args], env=self.env, cwd=self.tmp, capture_output=True,
                              text=True, timeout=timeout, check=False)

    @property
    def databases(self) -> dict[str, Path]:
        return {"subscriptions": self.tmp / "s.db", "events": self.tmp / "e.db", "mailer": self.tmp / "m.db"}


def make_cli(tmp: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
    env.update(SUBSCRIPTIONS_DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 's.db'}",
               MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 'm.db'}",
               EVENTS_DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 'e.db'}",
               BRIDGEPOST_ENV="dev", PYTHONWARNINGS="ignore")
    return Cli(tmp, env)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return make_cli(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def migrated(cli: Cli) -> subprocess.CompletedProcess[str]:
    return cli("migrate")


def key_rows(cli: Cli) -> list[list[str]]:
    """`api-key list` as rows: service, id, prefix…, role, name, state."""
    result = cli("api-key", "list")
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines() if line.strip()]


# --- help and argument errors ---------------------------------------------------------------------------


def test_top_level_help(cli: Cli) -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bridgepost")
    for sub in SUBCOMMANDS:
        assert sub in result.stdout


@pytest.mark.parametrize("args", [[sub, "--help"] for sub in SUBCOMMANDS]
                         + [["api-key", action, "--help"] for action in KEY_ACTIONS],
                         ids=lambda args: " ".join(args[:-1]))
def test_subcommand_help(cli: Cli, args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bridgepost {' '.join(args[:-1])}")
    assert result.stderr == ""


def test_no_command_is_a_usage_error(cli: Cli) -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage: bridgepost" in result.stderr


def test_serve_unknown_service_is_a_usage_error(cli: Cli) -> None:
    result = cli("serve", "nosuchservice")
    assert result.returncode == 2
    assert "invalid choice: 'nosuchservice'" in result.stderr
    assert result.stdout == ""


def test_create_key_with_unknown_role_is_refused(cli: Cli) -> None:
    result = cli("api-key", "create", "--role", "boss", "--name", "mallory")
    assert result.returncode != 0
    assert result.stdout == ""  # no key printed
    assert "--role must be one of editor, publisher, admin" in result.stderr
    assert "Traceback" not in result.stderr


def test_revoke_without_a_key_is_refused(cli: Cli) -> None:
    result = cli("api-key", "revoke")
    assert result.returncode != 0
    assert "needs the key's id or prefix" in result.stderr


def test_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Against a database that was never migrated: a clear message, exit 1."""
    result = make_cli(tmp_path)("api-key", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("bridgepost: ")
    assert "Traceback" not in result.stderr


# --- migrate and the key life cycle ---------------------------------------------------------------------


def test_a_served_service_leaves_its_startup_heap_out_of_full_collections() -> None:
    """`bridgepost serve` freezes what exists once the service has connected (shared.cli.settle_heap), after
    collecting what starting left behind. In a process of its own: it would freeze this test run's heap."""
    script = ("import asyncio, gc, weakref\n"
              "from shared.cli import settle_heap\n"
              "gc.disable()\n"  # only settle_heap's own collection may find the cycle
              "class Node: pass\n"
              "node = Node(); node.me = node; left_behind = weakref.ref(node); del node\n"  # an unreachable cycle
              "assert gc.get_freeze_count() == 0\n"
              "asyncio.run(settle_heap())\n"
              "print(gc.get_freeze_count(), left_behind() is None)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent, check=False)
    assert result.returncode == 0, result.stderr
    frozen, garbage_collected_first = result.stdout.split()
    assert int(frozen) > 10_000 and garbage_collected_first == "True", result.stdout


def test_migrate_creates_both_databases(cli: Cli, migrated: subprocess.CompletedProcess[str]) -> None:
    assert migrated.returncode == 0, migrated.stderr
    for name, path in cli.databases.items():
        assert f"{name}: database at the newest revision" in migrated.stdout
        assert path.is_file()
        with sqlite3.connect(path) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"alembic_version", "api_keys"} <= tables, name

    again = cli("migrate")  # idempotent
    assert again.returncode == 0, again.stderr


def test_api_key_life_cycle(cli: Cli, migrated: subprocess.CompletedProcess[str]) -> None:
    assert migrated.returncode == 0, migrated.stderr

    created = cli("api-key", "create", "--role", "admin", "--name", "alice")
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert key.startswith("bp_") and len(key) > 40
    assert created.stdout.strip() == key  # the key, and nothing else, on stdout
    assert "shown once" in created.stderr

    for path in cli.databases.values():  # stored only as a hash
        assert key.encode() not in path.read_bytes()

    rows = key_rows(cli)
    assert sorted(row[0] for row in rows) == sorted(SERVICES)
    for service, key_id, prefix, role, name, state in rows:
        assert key.startswith(prefix.rstrip("…")), service
        assert (role, name, state) == ("admin", "alice", "active")
        assert key not in "\t".join([service, key_id, prefix])
    ids = {row[0]: row[1] for row in rows}
    assert len(set(ids.values())) == 1  # one key, one id, in every service's database

    # by id (as `list` shows it, even with the ellipsis of the prefix column copied along): every service
    by_id = cli("api-key", "revoke", ids["subscriptions"])
    assert by_id.returncode == 0, by_id.stderr
    assert all(f"{name}: 1 key(s) revoked" in by_id.stdout for name in SERVICES)
    rows = key_rows(cli)
    assert len(rows) == len(SERVICES)
    assert all(row[4:] == ["alice", "revoked"] for row in rows)

    again = cli("api-key", "revoke", rows[0][2])  # already revoked: nothing left to revoke
    assert again.returncode != 0 and "no active key" in again.stderr
    unknown = cli("api-key", "revoke", "bp_nosuchk")
    assert unknown.returncode != 0
    assert all(f"{name}: 0 key(s) revoked" in unknown.stdout for name in SERVICES)
