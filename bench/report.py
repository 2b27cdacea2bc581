"""The combined benchmark report: each benchmark's latest figures next to the issue's targets.

Reads the summaries the benchmarks write (bench/results/signup.json, latency.json, campaign.json) and writes
bench/results/REPORT.md: the date and the machine's cores, then per benchmark its setup, when it ran, and each
figure with its target, whether it was met, and the load average before it was measured. `make bench` runs
every benchmark and then this; run it alone to rebuild the report from the summaries that are there.

    .venv/bin/python bench/report.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = (
    ("signup", "Sign-up throughput", "bench/signup.py"),
    ("latency", "Latency", "bench/latency.py"),
    ("campaign", "Campaign throughput", "bench/campaign.py"),
)


def value_text(f: dict[str, Any]) -> str:
    value = f["value"]
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,} {f['unit']}".strip() if isinstance(value, int | float) else str(value)


def met_text(f: dict[str, Any]) -> str:
    return "" if f["met"] is None else ("met" if f["met"] else "**NOT met**")


def section(name: str, title: str, script: str, data: dict[str, Any] | None, results: Path) -> list[str]:
    rows = [f"## {title} — `{script}`", ""]
    if data is None:
        text = f"No summary: `{script}` has not written `{name}.json` here yet."
        if (results / f"{name}.md").exists():
            text += f" Its last results file: [{name}.md]({name}.md)."
        return rows + [text, ""]
    details = Path(data.get("results", f"bench/results/{name}.md")).name
    rows += [
        f"{data['database']}; {data['setup']}. Run {data['date']} on {data['cores']} cores ({data['machine']}). "
        f"Details: [{details}]({details}).",
        "",
        "| figure | value | target | | load average before |",
        "|---|---:|---|---|---|",
    ]
    rows += [f"| {f['label']} | {value_text(f)} | {f['target']} | {met_text(f)} | {f.get('load', '')} |"
             for f in data["figures"]]
    return rows + [""]


def render(results: Path) -> str:
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Benchmark report",
        "",
        f"Written by `bench/report.py` (the last step of `make bench`) on {date}; this machine: {os.cpu_count()} "
        f"cores ({platform.system()} {platform.machine()}). Each benchmark's latest run, its figures next to the "
        "targets of the issue \"Prove it\" (printed, never enforced). The load average (1 / 5 / 15 min) was taken "
        "just before each measurement: on a machine with few cores, anything above the number of cores means "
        "other work shared them and the figures are pessimistic. How to rerun and where the time goes: "
        "[docs/performance.md](../../docs/performance.md).",
        "",
    ]
    for name, title, script in BENCHMARKS:
        path = results / f"{name}.json"
        data = json.loads(path.read_text("utf-8")) if path.exists() else None
        lines += section(name, title, script, data, results)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the summaries (default bench/results)")
    p.add_argument("--output", type=Path, default=None, help="the report (default: REPORT.md in --results)")
    args = p.parse_args()
    output = args.output or args.results / "REPORT.md"
    output.write_text(render(args.results), "utf-8")
    print(f"[bench] report written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
