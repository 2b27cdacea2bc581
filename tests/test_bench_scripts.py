"""The benchmark scripts under bench/ start and explain themselves (`--help`); the benchmarks are not run here
(only the small in-process `handover.py`, for the checks it makes, not its figures):
performance is measured by `make bench`, never by timed tests (SPEC §5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize(("script", "mentions"), [
    ("signup.py", ["--quick", "--concurrency", "--database", "--instances", "Targets"]),
    ("latency.py", ["--quick", "--rate", "--database", "Targets"]),
    ("campaign.py", ["--quick", "--subscribers", "--database"]),
    ("report.py", ["--results", "--output"]),
    ("handover.py", ["--recipients", "--size", "--database"]),
    ("restart.py", ["--sessions", "--rounds", "--quick"]),
    ("instructions.py", ["--seconds", "--concurrency", "callgrind"]),
])
def test_benchmark_script_shows_its_help(script: str, mentions: list[str]) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
    for text in mentions:
        assert text in result.stdout, f"{script} --help does not mention {text}"


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_the_handover_magnifier_takes_every_row_once_with_its_own_recipient(database: str) -> None:
    """bench/handover.py drives the engine's take-and-record loop over a small ledger; it fails (exit code)
    when a row comes back with another recipient's address or a row is left unsent."""
    result = subprocess.run([sys.executable, str(BENCH / "handover.py"), "--recipients", "600", "--size", "25",
                             "--database", database], capture_output=True, text=True, timeout=120, check=False)
    if database == "postgres" and "could not connect" in (result.stderr + result.stdout).lower():
        pytest.skip("PostgreSQL is not reachable")
    assert result.returncode == 0, result.stderr
    assert "600 mails in 24 groups of 25" in result.stdout, result.stdout
