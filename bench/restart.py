"""How long a service takes to consume again: at its first start, after a SIGKILL and after a normal stop.

The mailer (four consumer groups) is started as `bridgepost serve mailer` against the embedded broker and
a fresh SQLite database; "consuming" is its /readyz answering 200, which it does once its consumers have
joined their groups and hold their partitions. Each way of (re)starting is timed `--rounds` times, from
starting the process, for each `KAFKA_SESSION_TIMEOUT_MS` in `--sessions`: the embedded broker lets a
consumer's join wait half of it, and a crashed member keeps its partitions for all of it. The reference
measured in the same run is aiokafka's default (10000 ms), what the services use unless told otherwise.

    .venv/bin/python bench/restart.py                          # 2000 and 10000 ms, 3 rounds each
    .venv/bin/python bench/restart.py --sessions 1000,2000,6000 --rounds 5

Results: bench/results/restart.md (no target; docs/architecture.md and docs/performance.md quote it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from harness import (  # noqa: E402
    DEFAULT_POSTGRES_URL,
    RESULTS,
    Child,
    System,
    load_average,
    log,
    machine,
    run_main,
    system,
    wait_ready,
)

WAYS = ("first start", "after SIGKILL", "after SIGTERM")


async def consuming_after(sys_: System, child: Child | None, how: str) -> tuple[Child, float]:
    """Stop `child` the way `how` says (if there is one), start the mailer again on its port, and return the
    new process and the seconds from its start until /readyz answered 200."""
    if child is None:
        started = time.monotonic()
        (child,) = await sys_.serve("mailer")
    else:
        if how == "after SIGKILL":
            child.proc.send_signal(signal.SIGKILL)
            await child.proc.wait()
        else:
            await child.stop()
        sys_.children.remove(child)
        started = time.monotonic()
        child = Child("mailer", child.argv, child.env, sys_.folder, child.cwd)  # the same command and port
        sys_.children.append(child)
        await child.start()
    async with httpx.AsyncClient(timeout=10) as client:
        await wait_ready(client, f"{sys_.url('mailer')}/readyz", child, 180)
    return child, time.monotonic() - started


async def measure(session_ms: int, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-restart-") as folder:
            settings = {"KAFKA_SESSION_TIMEOUT_MS": str(session_ms), "MAILER_DIGEST_ENABLED": "false"}
            async with system(Path(folder), "sqlite", DEFAULT_POSTGRES_URL, settings) as sys_:
                child = None
                for way in WAYS:
                    child, seconds = await consuming_after(sys_, child, way)
                    times[way].append(seconds)
                    log(f"session {session_ms} ms, {way}: consuming after {seconds:.1f} s")
    return times


async def bench(args: argparse.Namespace) -> str:
    sessions = [int(s) for s in args.sessions.split(",")]
    load = load_average()
    results = {s: await measure(s, args.rounds) for s in sessions}
    reference = results.get(10_000)
    here = machine()
    lines = [
        "# Consuming again after a (re)start",
        "",
        "Written by `bench/restart.py` (see its docstring): seconds from starting `bridgepost serve mailer` until",
        "its /readyz answers 200 (its four consumers have joined their groups), median of "
        f"{args.rounds} rounds (min–max), per `KAFKA_SESSION_TIMEOUT_MS`. The embedded broker, SQLite.",
        "",
        f"{here['cores']} cores ({here['machine']}); {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; "
        f"load average before: {load}.",
        "",
        "| session timeout | " + " | ".join(WAYS) + " |",
        "|---|" + "---:|" * len(WAYS),
    ]
    for session_ms, times in results.items():
        cells = []
        for way in WAYS:
            median = statistics.median(times[way])
            cell = f"{median:.1f} s ({min(times[way]):.1f}–{max(times[way]):.1f})"
            if reference and session_ms != 10_000:
                cell += f", {median / statistics.median(reference[way]):.2f} of 10000"
            cells.append(cell)
        lines.append(f"| {session_ms} ms | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    (RESULTS / "restart.md").write_text(report, "utf-8")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="2000,10000",
                   help="KAFKA_SESSION_TIMEOUT_MS values, comma-separated (default 2000,10000)")
    p.add_argument("--rounds", type=int, default=3, help="fresh systems per session timeout (default 3)")
    p.add_argument("--quick", action="store_true", help="one round (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.rounds = 1
    status, report = run_main(lambda: bench(args))
    if report:
        print(report)
    return status


if __name__ == "__main__":
    sys.exit(main())
