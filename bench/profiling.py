"""Sampling the services with py-spy while a benchmark runs, and summing the samples up.

`Profiler` records one process (`py-spy record --format raw --threads --full-filenames`) from `start()` until
`stop()`; `summarise_profile` turns the raw stacks into how busy each thread was, time by package, the top
frames by self time and the project's functions by inclusive time; `write_collapsed` keeps the stacks in the
collapsed format of flamegraph.pl / speedscope. Samples of threads waiting in a queue, lock or selector are
left out (py-spy does not recognise all of them as idle on Python 3.11; the summary looks at the sampled line).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import linecache
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from harness import ROOT, VENV_BIN, log


def py_spy(install: bool) -> str:
    """The py-spy binary; installed into the virtual environment with pip when missing (unless not `install`)."""
    path = VENV_BIN / "py-spy"
    if path.exists():
        return str(path)
    if found := shutil.which("py-spy"):
        return found
    if not install:
        raise RuntimeError("py-spy not found; install it: .venv/bin/pip install py-spy")
    log("py-spy not found: installing it into the virtual environment (pip install py-spy)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(path)


class Profiler:
    """py-spy sampling one process into a raw stacks file."""

    def __init__(self, spy_bin: str, pid: int, output: Path, rate: int = 100) -> None:
        self.spy_bin, self.pid, self.output, self.rate = spy_bin, pid, output, rate
        self.logfile = output.with_suffix(".log")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.logfile, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
            self.proc = await asyncio.create_subprocess_exec(
                self.spy_bin, "record", "--pid", str(self.pid), "--format", "raw", "--threads", "--full-filenames",
                "--rate", str(self.rate), "--output", str(self.output),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        await asyncio.sleep(1.0)  # attached
        if self.proc.returncode is not None:
            raise RuntimeError(f"py-spy exited: {self.logfile.read_text('utf-8', 'replace')[-1000:]}")

    async def stop(self) -> None:
        """Ends the recording (SIGINT makes py-spy write its file); killed if it does not end."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


FRAME = re.compile(r"(.*) \((.*):(\d+)\)$")
BLOCKING = re.compile(r"\.(get|wait|acquire|select|poll|sleep)\(")
STDLIB = sysconfig.get_paths()["stdlib"] + "/"


def short_path(path: str) -> str:
    for cut in ("site-packages/", str(ROOT) + "/", STDLIB):
        if cut in path:
            return path.split(cut, 1)[1]
    return path


def project_file(path: str) -> bool:
    return path.startswith((str(ROOT / "services") + "/", str(ROOT / "shared") + "/"))


def package(path: str) -> str:
    """What a frame's file belongs to: a library, the standard library, or the project's package folder."""
    if "site-packages/" in path:
        return short_path(path).split("/")[0].removesuffix(".py")
    if path.startswith(STDLIB):
        return short_path(path).split("/")[0].removesuffix(".py") + " (stdlib)"
    if project_file(path):
        return "/".join(short_path(path).split("/")[:2])
    return short_path(path)


def is_waiting(frame: str) -> bool:
    """A leaf frame blocked in a wait (queue get, condition wait, selector poll): py-spy on Python 3.11 does not
    always recognise such threads as idle, so the summary drops them by looking at the source line."""
    m = FRAME.match(frame)
    return bool(m and BLOCKING.search(linecache.getline(m.group(2), int(m.group(3)))))


def write_collapsed(raw: Path, output: Path) -> None:
    """The stacks in the collapsed format of flamegraph.pl / speedscope, by function (no line numbers),
    with short file names: a fraction of py-spy's raw output."""
    stacks: collections.Counter[str] = collections.Counter()
    for line in raw.read_text("utf-8", "replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.partition(": ")[2].split(";"):
            m = FRAME.match(frame)
            frames.append(f"{m.group(1)} ({short_path(m.group(2))})" if m else re.sub(r"\d+", "N", frame))
        stacks[";".join(frames)] += int(count)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(f"{stack} {n}\n" for stack, n in stacks.most_common()), "utf-8")


def summarise_profile(raw: Path, seconds: float, rate: int, top: int = 15) -> dict:
    """Busy share per thread, top frames by self time, time by package, project functions by inclusive time.

    py-spy's raw format (with --threads, --full-filenames): `thread (<id>): <thread name>;<frame>;...;<leaf>
    <samples>`, each frame `function (file:line)`. Samples waiting (see is_waiting) are left out.
    """
    self_time: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    busy = waiting = 0
    for line in raw.read_text("utf-8", "replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.partition(": ")[2].split(";")
        thread = frames.pop(0) if frames and not FRAME.match(frames[0]) else "?"
        if not frames or is_waiting(frames[-1]):
            waiting += n
            continue
        busy += n
        threads[re.sub(r"\d+", "N", thread)] += n
        leaf = FRAME.match(frames[-1])
        if leaf:
            self_time[f"{leaf.group(1)} ({short_path(leaf.group(2))}:{leaf.group(3)})"] += n
            packages[package(leaf.group(2))] += n
        functions = set()
        for frame in frames:
            m = FRAME.match(frame)
            if m and project_file(m.group(2)) and not m.group(2).endswith("shared/cli.py"):
                functions.add(f"{m.group(1)} ({short_path(m.group(2))})")
        for function in functions:  # once per sample, however deep the recursion
            inclusive[function] += n
    wall = max(1.0, seconds * rate)  # samples a thread busy all the time would have
    return {"busy": busy, "waiting": waiting, "self": self_time.most_common(top),
            "packages": packages.most_common(12), "inclusive": inclusive.most_common(top),
            "threads": [(name, n, n / wall) for name, n in threads.most_common()]}



def profile_lines(p: dict, what: str) -> list[str]:
    """The summary of `summarise_profile` as text lines (for the terminal and the markdown results)."""
    busy = max(1, p["busy"])
    return [
        f"profile of {what} (py-spy {p['rate']} Hz over {p['seconds']:.0f} s; {p['busy']} busy samples, "
        f"{p['waiting']} waiting ones left out; stacks in {p['file']}):",
        "  threads busy (share of wall time): "
        + ", ".join(f"{name} {share:.0%}" for name, _n, share in p["threads"]),
        "  busy samples by package (self time): " + ", ".join(f"{name} {n / busy:.0%}" for name, n in p["packages"]),
        "  top frames by self time (share of busy samples):",
        *(f"    {n / busy:6.1%}  {frame}" for frame, n in p["self"]),
        "  project functions by inclusive time (share of busy samples):",
        *(f"    {n / busy:6.1%}  {frame}" for frame, n in p["inclusive"]),
    ]
