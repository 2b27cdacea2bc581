"""Instructions per sign-up and per confirmation mail: the CPU cost of the sign-up path, counted, not timed.

On a shared machine the same code runs up to a third faster or slower from one minute to the next (other
tenants), so a change worth a few percent cannot be seen in sign-ups per second or in CPU seconds. What a
process executes can be: this benchmark starts the system as bench/signup.py does, but runs the
subscriptions service and the mailer under valgrind's callgrind with its counting switched off, and
switches it on (`callgrind_control --instr=on`) only for one closed-loop level of sign-ups. When every
confirmation mail is in the sink (and the delivery reports have been consumed) it dumps both counts. Every
instruction of the two processes in that window counts: the HTTP request, the batch writer, the outbox
relay and the delivery reports in the one; the consumer, the sending loop, SMTP and the relay in the other.

Printed: instructions per accepted sign-up (subscriptions) and per confirmation mail (mailer), and the
reference measured in the same run, `python -c pass` under callgrind (the interpreter's start): runs are
comparable while the reference stays the same (same interpreter, same valgrind). Runs of the same code agree
within about 2 % (subscriptions) and 5 % (mailer, whose groups of mails depend on timing): alternate the
versions to compare (A B A B). The instrumented services run some 50 times
slower, so with the same number in flight their batches are not those of a full-speed run: compare counts
of the same `--concurrency`, not with CPU seconds from bench/signup.py.

    .venv/bin/python bench/instructions.py                    # 40 s at 100 in flight (about 1,200 sign-ups)
    .venv/bin/python bench/instructions.py --seconds 60 --concurrency 20

Needs valgrind (`apt-get install valgrind`). Results: bench/results/instructions.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402 - the folder of the benchmarks is on sys.path now
from harness import (  # noqa: E402
    RESULTS,
    ROOT,
    free_port,
    given_settings,
    log,
    machine,
    run_main,
    system,
    wait_port,
    write_section,
)
from signup import SINK, LoadGenerator, wait_mails  # noqa: E402

DEFAULT_OUTPUT = RESULTS / "instructions.md"
SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.M)


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=120)


def dumped_instructions(folder: Path, pid: int, since: float) -> int:
    """The instructions in the dumps callgrind wrote for `pid` after `since` (one per `--dump`)."""
    total = 0
    for path in folder.glob(f"callgrind.out.{pid}*"):
        if path.stat().st_mtime >= since:
            m = SUMMARY.search(path.read_bytes())
            if m:
                total += int(m.group(1))
    return total


def reference(folder: Path) -> int:
    """Instructions of `python -c pass` under callgrind: the interpreter's start, a fixed amount of work."""
    out = folder / "reference.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", "pass"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = SUMMARY.search(out.read_bytes())
    assert m, "callgrind wrote no summary"
    return int(m.group(1))


async def wait_count(pid_folder: Path, pid: int, since: float, within: float = 120) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if n := dumped_instructions(pid_folder, pid, since):
            return n
        await asyncio.sleep(0.5)
    raise RuntimeError(f"callgrind wrote no dump for process {pid}")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    tmp = tempfile.TemporaryDirectory(prefix="bridgepost-instructions-")
    shm = tempfile.TemporaryDirectory(prefix="bridgepost-sink-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    folder, dumps = Path(tmp.name), Path(shm.name)
    counts = folder / "callgrind"
    counts.mkdir()
    smtp_port = free_port()
    settings = {
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port),
        "SUBSCRIPTIONS_TRUST_FORWARDED_FOR": "true",
        "MAILER_SEND_RATE_PER_SECOND": "0",
        "PUBLIC_BASE_URL": "http://127.0.0.1:8001",
        **given_settings(args.set),
    }
    wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-systime=no",
               f"--callgrind-out-file={counts}/callgrind.out.%p"]
    gen: LoadGenerator | None = None
    try:
        ref = reference(folder)
        log(f"reference: python -c pass, {ref / 1e6:.1f} M instructions")
        async with system(folder, "sqlite", "", settings) as sys_:
            sink = await sys_.spawn("smtp-sink", [SINK, *(["-u", "root"] if os.geteuid() == 0 else []),
                                                  "-d", f"{dumps}/%Y%m%d%H%M%S.", f"127.0.0.1:{smtp_port}", "1024"])
            await wait_port(smtp_port, 10, sink)
            services = {name: (await sys_.serve(name, wrapper=wrapper))[0] for name in ("subscriptions", "mailer")}
            await sys_.wait_ready(within=600)
            log("ready (under valgrind, counting off)")
            gen = LoadGenerator([sys_.url("subscriptions")])
            gen.start()
            # Warm-up at full speed (not counted): imports, caches, statements compiled, connections open.
            warm = await gen.run(loadgen.Plan("closed", 3.0, "warm", run, 0, concurrency=5))
            warm_n = sum(1 for s in warm["samples"] if s[1] == 202)
            await wait_mails(dumps, warm_n, 300, [services["mailer"]])
            await asyncio.sleep(2.0)
            for child in services.values():
                callgrind_control("--zero", str(child.pid))
                callgrind_control("--instr=on", str(child.pid))
            log(f"counting: closed loop, {args.concurrency} in flight, for {args.seconds:g} s")
            started = time.time()
            result = await gen.run(loadgen.Plan("closed", args.seconds, "count", run, 10 ** 6,
                                                concurrency=args.concurrency))
            accepted = sum(1 for s in result["samples"] if s[1] == 202)
            log(f"{accepted} sign-ups accepted in {result['elapsed']:.0f} s; waiting for their mails")
            got, waited = await wait_mails(dumps, warm_n + accepted, args.drain_timeout, [services["mailer"]])
            mails = got - warm_n
            await asyncio.sleep(args.settle)  # the delivery reports of the last mails, consumed
            for child in services.values():
                callgrind_control("--dump", str(child.pid))
            sub_ir = await wait_count(counts, services["subscriptions"].pid, started)
            mail_ir = await wait_count(counts, services["mailer"].pid, started)
            if args.keep:  # for callgrind_annotate / kcachegrind: which functions of which library
                args.keep.mkdir(parents=True, exist_ok=True)
                for name, child in services.items():
                    for path in counts.glob(f"callgrind.out.{child.pid}*"):
                        if path.stat().st_mtime >= started:
                            shutil.copyfile(path, args.keep / f"callgrind.{name}.out")
                log(f"callgrind's dumps in {args.keep}: callgrind_annotate {args.keep}/callgrind.mailer.out")
        return {
            "signups": accepted, "mails": mails, "concurrency": args.concurrency, "seconds": result["elapsed"],
            "drain": waited, "reference": ref, "subscriptions": sub_ir, "mailer": mail_ir,
            "per_signup": sub_ir / max(1, accepted), "per_mail": mail_ir / max(1, mails),
            "settings": args.set, **machine(),
        }
    finally:
        if gen is not None:
            gen.stop()
        tmp.cleanup()
        shm.cleanup()


def render(r: dict[str, Any]) -> str:
    ref = r["reference"]
    return "\n".join([
        f"bridgepost instructions per item — SQLite, one instance each, {r['concurrency']} sign-ups in flight"
        + (f", settings {' '.join(r['settings'])}" if r["settings"] else ""),
        f"machine: {r['cores']} cores ({r['machine']}), date: {r['date']}; counted by callgrind, not timed",
        f"{r['signups']} sign-ups accepted in {r['seconds']:.0f} s under valgrind, {r['mails']} confirmation mails",
        f"  subscriptions: {r['per_signup'] / 1e6:.3f} M instructions per sign-up "
        f"({r['per_signup'] / ref:.3f} × the reference)",
        f"  mailer:        {r['per_mail'] / 1e6:.3f} M instructions per mail "
        f"({r['per_mail'] / ref:.3f} × the reference)",
        f"  both:          {(r['per_signup'] + r['per_mail']) / 1e6:.3f} M instructions per sign-up and its mail",
        f"reference: `python -c pass` under callgrind, {ref / 1e6:.2f} M instructions (the interpreter's start)",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Counted by valgrind's callgrind.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=40.0,
                   help="length of the counted level, in seconds (default 40: about 1,200 sign-ups under callgrind)")
    p.add_argument("--concurrency", type=int, default=100, help="sign-ups in flight (default 100)")
    p.add_argument("--drain-timeout", type=float, default=900, help="longest wait for the mails, in seconds")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds after the last mail before counting stops (delivery reports; default 5)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a setting for every service")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="copy callgrind's dumps of the counted level here (callgrind.<service>.out)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind not found: apt-get install valgrind", file=sys.stderr)
        return 2
    code, r = run_main(lambda: bench(args))
    if r is None:
        return code
    text = render(r)
    print(text)
    write_section(args.output, "# Instructions per sign-up and per mail\n", "sqlite", f"```\n{text}\n```\n")
    log(f"written to {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
