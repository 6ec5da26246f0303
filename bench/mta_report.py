#!/usr/bin/env python3
"""Helpers and report for bench/mta.sh (the process-tree CPU helpers are in smtp_report.py).

Subcommands:
  message --size N --out FILE   the test message for `smtp-source -F`: headers with
                                From: <alice@example.test> (the DKIM signing domain) and a
                                body, N bytes in all as sent (smtp-source ends every line
                                with CRLF).
  rusage --out FILE -- CMD...   run CMD, write the CPU seconds (user+system) of it and every
                                descendant it reaped to FILE, exit with CMD's status.
  result ...                    write one run's JSON result.
  report ...                    summarise a run directory: per contender min/median/max
                                drain msgs/s, median ratios vs postfix and vs
                                smtp-sink-direct, CPU ms per message.
"""

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys

FROM = "alice@example.test"
TO = "bob@remote.test"


def cmd_message(a):
    headers = [
        f"From: <{FROM}>",
        f"To: <{TO}>",
        "Subject: ringmail MTA delivery benchmark",
        "Date: Sat, 28 Nov 2026 00:00:00 +0000",
        "Message-ID: <mta-bench@example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    size = sum(len(h) + 2 for h in headers)
    body = []
    line = "The quick brown fox jumps over the lazy dog, again and again, 0123456789."
    while size < a.size:
        room = a.size - size - 2
        if room <= 0:
            break
        text = line[:room]
        body.append(text)
        size += len(text) + 2
    with open(a.out, "w") as f:
        f.write("\n".join(headers + body) + "\n")


def cmd_rusage(a):
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc = subprocess.call(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(a.out, "w") as f:
        f.write(f"{cpu:.3f}\n")
    return rc


def opt_int(s):
    return int(float(s)) if s not in (None, "") else None


def cmd_result(a):
    drain = a.t1 - a.t0
    r = {
        "contender": a.contender, "round": a.round,
        "messages": a.messages, "size": a.size,
        "accepted": a.accepted, "delivered": a.delivered, "sink_final": a.sink_final,
        "t0": a.t0, "t1": a.t1, "drain_s": drain,
        # how long the release command itself took (ringmail queue flush / postqueue -f)
        "release_cmd_s": a.release_cmd_s,
        "msgs_per_s": a.delivered / drain if drain > 0 and a.delivered >= a.accepted else None,
        "cpu_s": a.cpu1 - a.cpu0,
        "cpu_ms_per_msg": (a.cpu1 - a.cpu0) * 1000 / a.delivered if a.delivered else None,
        "sink_cpu_ms_per_msg": (a.sink_cpu1 - a.sink_cpu0) * 1000 / a.delivered if a.delivered else None,
        "alive": bool(a.alive), "release_rc": a.release_rc,
        "fill_s": a.fill_s, "hold_s": a.hold_s, "release_s": a.release_s,
        "deferred_after_fill": opt_int(a.deferred_fill),
        # signatures made during the drain (ringmail counts one per attempt, and the fill's
        # failed first attempts were signed too)
        "dkim_signed": (opt_int(a.signed) - (opt_int(a.signed_held) or 0)) if a.signed else None,
        "queue_left": opt_int(a.queue_left),
    }
    with open(a.out, "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def fmt_rate(v):
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_report(a):
    contenders = a.contenders.split()
    runs = {}
    for path in sorted(glob.glob(os.path.join(a.run_dir, "*--r*.json")) +
                       glob.glob(os.path.join(a.run_dir, "*--r*.fail"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        name, rnd = stem.split("--")
        slot = runs.setdefault(name, {}).setdefault(int(rnd[1:]), {"result": None, "failure": None})
        if ext == ".json":
            try:
                with open(path) as f:
                    slot["result"] = json.load(f)
            except (OSError, ValueError) as e:
                slot["failure"] = f"unreadable result: {e}"
        else:
            with open(path) as f:
                slot["failure"] = f.read().strip()
    raw = [{"contender": n, "round": r, **s} for n in sorted(runs) for r, s in sorted(runs[n].items())]

    def ok_runs(name):
        """Runs that count: no failure, every message reached the sink."""
        return [s["result"] for s in runs.get(name, {}).values()
                if s["result"] is not None and not s["failure"]
                and s["result"]["msgs_per_s"] is not None]

    meds = {n: median([r["msgs_per_s"] for r in ok_runs(n)]) for n in contenders}
    lines = [f"# MTA delivery from the queue, side by side ({os.path.basename(a.run_dir)})", ""]
    lines += [f"Machine: `{a.machine}`", "", f"Parameters: `{a.meta}`", ""]
    lines.append(
        "Each run fills the contender's queue with the messages while delivery is held (ringmail: "
        "the relay is down, every first attempt deferred; Postfix: defer_transports), then starts "
        "the downstream smtp-sink, releases (`ringmail queue flush` / `postqueue -f`) and times "
        "until the sink has every message. smtp-sink-direct: smtp-source straight into the sink. "
        "release cmd s = how long `ringmail queue flush` / `postqueue -f` took to return "
        "(the drain may overlap it). CPU = the contender's process tree during the drain (Postfix: master and all its "
        "daemons; smtp-sink-direct: smtp-source); sink CPU = the downstream smtp-sink. Ratios are "
        "median / median. Loopback, shared cores: compare within one run only.")
    lines += ["", "| contender | ok runs | msgs/s min | median | max | vs postfix | vs smtp-sink-direct "
              "| CPU ms/msg | sink CPU ms/msg | drain s (median) | release cmd s (median) "
              "| delivered/messages | DKIM signed |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for name in contenders:
        all_runs = runs.get(name, {})
        ok = ok_runs(name)
        vals = [r["msgs_per_s"] for r in ok]
        med = meds.get(name)

        def ratio(ref):
            m = meds.get(ref)
            if med is None or not m or ref == name:
                return None
            return med / m

        results = [s["result"] for s in all_runs.values() if s["result"] is not None]
        msgs = sum(r["messages"] for r in results)
        dlv = sum(min(r["delivered"], r["messages"]) for r in results)
        dups = sum(max(0, r["sink_final"] - r["messages"]) for r in results)
        signed = [r["dkim_signed"] for r in results if r.get("dkim_signed") is not None]
        cpu = median([r["cpu_ms_per_msg"] for r in ok])
        scpu = median([r["sink_cpu_ms_per_msg"] for r in ok])
        drain = median([r["drain_s"] for r in ok])
        rel = median([r.get("release_cmd_s") for r in ok]) if name != "smtp-sink-direct" else None
        dcell = f"{dlv}/{msgs}" + (f" (+{dups} extra)" if dups else "") if results else "n/a"
        scell = f"{sum(signed)}" if signed and name.startswith("ringmail") else "n/a"
        lines.append("| " + " | ".join([
            name, f"{len(ok)}/{len(all_runs)}",
            fmt_rate(min(vals)) if vals else "n/a", fmt_rate(med),
            fmt_rate(max(vals)) if vals else "n/a",
            fmt(ratio("postfix"), "{:.2f}x"), fmt(ratio("smtp-sink-direct"), "{:.2f}x"),
            fmt(cpu, "{:.3f}"), fmt(scpu, "{:.3f}"), fmt(drain, "{:.2f}"), fmt(rel, "{:.2f}"), dcell, scell]) + " |")
        summary[name] = {
            "runs": len(all_runs), "ok": len(ok),
            "msgs_per_s": {"min": min(vals) if vals else None, "median": med,
                           "max": max(vals) if vals else None},
            "vs_postfix": ratio("postfix"), "vs_smtp_sink_direct": ratio("smtp-sink-direct"),
            "cpu_ms_per_msg": cpu, "sink_cpu_ms_per_msg": scpu, "drain_s_median": drain,
            "release_cmd_s_median": rel,
            "messages": msgs, "delivered": dlv, "extra_at_sink": dups,
            "dkim_signed": sum(signed) if signed else None,
            "fill_s_median": median([r["fill_s"] for r in results]),
            "failures": [s["failure"] for s in all_runs.values() if s["failure"]],
        }
    notes = [f"{n}: {summary[n]['failures'][0]}" for n in contenders if summary[n]["failures"]]
    if notes:
        lines += ["", "Failed runs (first reason): " + "; ".join(f"`{n}`" for n in notes)]
    lines.append("")
    with open(a.md, "w") as f:
        f.write("\n".join(lines))
    with open(a.json, "w") as f:
        json.dump({"meta": a.meta, "machine": a.machine, "summary": summary, "runs": raw}, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("message")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_message)
    p = sub.add_parser("rusage")
    p.add_argument("--out", required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_rusage)
    p = sub.add_parser("result")
    p.add_argument("--out", required=True)
    p.add_argument("--contender", required=True)
    for k in ("round", "messages", "size", "accepted", "delivered", "sink-final", "alive", "release-rc"):
        p.add_argument(f"--{k}", type=int, required=True)
    for k in ("t0", "t1", "cpu0", "cpu1", "sink-cpu0", "sink-cpu1", "fill-s", "hold-s", "release-s",
              "release-cmd-s"):
        p.add_argument(f"--{k}", type=float, required=True)
    for k in ("deferred-fill", "signed", "signed-held", "queue-left"):
        p.add_argument(f"--{k}", default="")
    p.set_defaults(fn=cmd_result)
    p = sub.add_parser("report")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--contenders", required=True)
    p.add_argument("--meta", default="")
    p.add_argument("--machine", default="")
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args()
    return a.fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
