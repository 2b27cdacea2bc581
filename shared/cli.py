"""The `bridgepost` command line: dev, serve, migrate, api-key (SPEC §4)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVICES = ("subscriptions", "events", "mailer")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    settings: Callable[..., Any]
    create_app: Callable[[Any], Any]
    migrations: Path
    infra: Any


def service(name: str) -> ServiceSpec:
    """Import a service lazily, so `bridgepost --help` stays fast."""
    if name == "subscriptions":
        from services.subscriptions import app, store
        from services.subscriptions.settings import SubscriptionsSettings
        return ServiceSpec(name, SubscriptionsSettings, app.create_app, app.MIGRATIONS, store.infra)
    if name == "events":
        from services.events import app, store
        from services.events.settings import EventsSettings
        return ServiceSpec(name, EventsSettings, app.create_app, app.MIGRATIONS, store.infra)
    if name == "mailer":
        from services.mailer import app, store
        from services.mailer.settings import MailerSettings
        return ServiceSpec(name, MailerSettings, app.create_app, app.MIGRATIONS, store.infra)
    raise SystemExit(f"bridgepost: unknown service {name!r} (one of: {', '.join(SERVICES)})")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("aiokafka", "faststream", "bridgepost.kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def migrate(names: list[str]) -> None:
    from shared.db import migrate as run_migrations
    for name in names:
        spec = service(name)
        settings = spec.settings()
        await run_migrations(settings.database_url, spec.migrations)
        print(f"{name}: database at the newest revision")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    spec = service(args.service)
    settings = spec.settings()
    configure_logging(settings.log_level)
    if args.migrate:
        asyncio.run(migrate([args.service]))
    port = args.port or settings.port
    uvicorn.run(spec.create_app(settings), host=args.host, port=port, log_level="warning",
                proxy_headers=False, timeout_graceful_shutdown=10)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    asyncio.run(migrate(args.services or list(SERVICES)))
    return 0


async def _keys(args: argparse.Namespace) -> int:
    from shared.auth import ROLES, generate_key, list_keys, register_key, revoke_key
    from shared.db import Database
    names = args.services or list(SERVICES)
    if args.action == "create":
        if args.role not in ROLES:
            print(f"bridgepost: --role must be one of {', '.join(ROLES)}", file=sys.stderr)
            return 2
        key = args.key or generate_key()
        for name in names:
            spec = service(name)
            db = Database(spec.settings().database_url)
            try:
                await register_key(db, spec.infra, key, args.role, args.name)
            finally:
                await db.dispose()
        print(key)
        print(f"(role {args.role}, registered with {', '.join(names)}; shown once, stored only as a hash)",
              file=sys.stderr)
        return 0
    revoked_total = 0
    for name in names:
        spec = service(name)
        db = Database(spec.settings().database_url)
        try:
            if args.action == "list":
                for row in await list_keys(db, spec.infra):
                    state = "revoked" if row["revoked_at"] else "active"
                    print(f"{name}\t{row['id']}\t{row['prefix']}…\t{row['role']}\t{row['name']}\t{state}")
            else:
                count = await revoke_key(db, spec.infra, args.key_id.rstrip("…"))
                print(f"{name}: {count} key(s) revoked")
                revoked_total += count
        finally:
            await db.dispose()
    if args.action == "revoke" and not revoked_total:
        print(f"bridgepost: no active key matches {args.key_id!r}", file=sys.stderr)
        return 1
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    if args.action == "revoke" and not args.key_id:
        print("bridgepost: api-key revoke needs the key's id or prefix", file=sys.stderr)
        return 2
    return asyncio.run(_keys(args))


def cmd_dev(args: argparse.Namespace) -> int:
    from shared.dev import run_dev
    return run_dev(Path(args.var))


def cmd_inbox(args: argparse.Namespace) -> int:
    from shared.devinbox import run_inbox
    configure_logging()
    try:
        asyncio.run(run_inbox(Path(args.maildir), smtp_port=args.smtp_port, web_port=args.web_port))
    except KeyboardInterrupt:
        pass
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bridgepost", description="bridgepost: newsletter with real double opt-in")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run everything on this machine (what `make dev` runs)")
    dev.add_argument("--var", default="var", help="folder for databases and the dev inbox (default: var)")
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--host", default=os.environ.get("BRIDGEPOST_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=None,
                       help="default: <SERVICE>_PORT (8001 subscriptions, 8002 events, 8003 mailer)")
    serve.add_argument("--migrate", action="store_true", help="migrate the database first")
    serve.set_defaults(func=cmd_serve)

    migrate_p = sub.add_parser("migrate", help="bring the services' databases to the newest revision")
    migrate_p.add_argument("services", nargs="*", metavar="SERVICE", help="default: all services")
    migrate_p.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("api-key", help="staff API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--role", required=True, help="editor, publisher or admin")
    create.add_argument("--name", default="staff", help="who the key is for")
    create.add_argument("--key", default=None, help=argparse.SUPPRESS)
    keys_sub.add_parser("list", help="list keys")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key_id", nargs="?")
    for sp in keys_sub.choices.values():
        sp.add_argument("--service", dest="services", action="append", choices=SERVICES,
                        help="only this service's database (default: all)")
    keys.set_defaults(func=cmd_api_key)

    inbox = sub.add_parser("inbox", help="run only the development mail inbox")
    inbox.add_argument("--maildir", default="var/maildir")
    inbox.add_argument("--smtp-port", type=int, default=1025)
    inbox.add_argument("--web-port", type=int, default=8025)
    inbox.set_defaults(func=cmd_inbox)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear message, not a stack trace, for a person at a terminal
        if os.environ.get("BRIDGEPOST_DEBUG"):
            raise
        print(f"bridgepost: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
