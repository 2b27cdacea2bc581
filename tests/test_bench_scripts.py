"""The benchmark scripts under bench/ start and explain themselves (`--help`); the benchmarks are not run here:
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
])
def test_benchmark_script_shows_its_help(script: str, mentions: list[str]) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout
    for text in mentions:
        assert text in result.stdout, f"{script} --help does not mention {text}"
