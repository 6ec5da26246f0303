#!/usr/bin/env python3
"""Helpers and report for bench/smtp.sh.

Subcommands:
  cpu PID        CPU seconds of PID's process tree: sum over PID and all its
                 live descendants of utime+stime+cutime+cstime (/proc/*/stat),
                 so children that exited and were reaped still count (their
                 time is in the parent's cutime/cstime).
  tree PID       PID and its live descendants, one per line.
  fsync DIR      latency of a 4 KiB write+fsync in DIR (bounded: 200 rounds or 5 s).
  result ...     write one run's JSON result.
  report ...     summarise a run directory into markdown and one JSON file:
                 per contender min/median/max msgs/s over the repeats,
                 median-based ratios vs smtp-sink and vs postfix, CPU per
                 message, delivered/accepted.
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_procs():
    """pid -> (ppid, ticks) for every process visible in /proc."""
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        # rest[0] = state (field 3), rest[1] = ppid (4), rest[11..14] = utime stime cutime cstime (14..17)
        ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        procs[int(d)] = (int(rest[1]), ticks)
    return procs


def tree(root, procs):
    children = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in procs else []
    while todo and len(out) < 100000:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cmd_cpu(a):
    procs = read_procs()
    ticks = sum(procs[p][1] for p in tree(a.pid, procs))
    print(f"{ticks / CLK_TCK:.2f}")


def cmd_tree(a):
    for p in tree(a.pid, read_procs()):
        print(p)


def cmd_fsync(a):
    path = os.path.join(a.dir, "fsync-probe")
    buf = b"x" * 4096
    lat = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        deadline = time.monotonic() + 5
        for i in range(200):
            if time.monotonic() > deadline:
                break
            os.pwrite(fd, buf, (i % 16) * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    p90 = lat[min(len(lat) - 1, int(len(lat) * 0.9))]
    print(f"median {statistics.median(lat):.3f} ms, p90 {p90:.3f} ms, max {lat[-1]:.3f} ms (n={len(lat)})")


def cmd_result(a):
    wall = a.t1 - a.t0
    drain = a.t2 - a.t0
    try:
        with open(a.source_err) as f:
            err_tail = f.read()[-300:].strip()
    except OSError:
        err_tail = ""
    r = {
        "contender": a.contender, "round": a.round,
        "messages": a.messages, "sessions": a.sessions, "size": a.size,
        "source_rc": a.source_rc, "accepted": a.accepted, "delivered": a.delivered,
        "wall_s": wall,
        "msgs_per_s": a.accepted / wall if wall > 0 else None,
        # until the last accepted message was seen downstream (or the drain timeout)
        "end_to_end_s": drain,
        "end_to_end_msgs_per_s": a.delivered / drain if drain > 0 else None,
        "cpu_accept_s": a.cpu1 - a.cpu0,
        "cpu_total_s": a.cpu2 - a.cpu0,
        "cpu_ms_per_msg": (a.cpu2 - a.cpu0) * 1000 / a.accepted if a.accepted else None,
        "cpu_accept_ms_per_msg": (a.cpu1 - a.cpu0) * 1000 / a.accepted if a.accepted else None,
        "server_alive": bool(a.alive),
        "source_stderr_tail": err_tail,
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
    raw = []
    for path in sorted(glob.glob(os.path.join(a.run_dir, "*--r*.json")) +
                       glob.glob(os.path.join(a.run_dir, "*--r*.fail"))):
        stem, ext = os.path.splitext(os.path.basename(path))
        name, rnd = stem.split("--")
        rnd = int(rnd[1:])
        slot = runs.setdefault(name, {}).setdefault(rnd, {"result": None, "failure": None})
        if ext == ".json":
            try:
                with open(path) as f:
                    slot["result"] = json.load(f)
            except (OSError, ValueError) as e:
                slot["failure"] = f"unreadable result: {e}"
        else:
            with open(path) as f:
                slot["failure"] = f.read().strip()
    for name in sorted(runs):
        for rnd in sorted(runs[name]):
            s = runs[name][rnd]
            raw.append({"contender": name, "round": rnd, **s})

    def ok_runs(name):
        """Runs that count for the rate: smtp-source succeeded and every message was accepted."""
        out = []
        for s in runs.get(name, {}).values():
            r = s["result"]
            if r is None or s["failure"]:
                continue
            if r["accepted"] != r["messages"]:
                continue
            out.append(r)
        return out

    meds = {n: median([r["msgs_per_s"] for r in ok_runs(n)]) for n in contenders}
    lines = [f"# SMTP acceptance side-by-side ({os.path.basename(a.run_dir)})", ""]
    lines.append(f"Machine: `{a.machine}`")
    lines.append("")
    lines.append(f"Parameters: `{a.meta}`")
    lines.append("")
    lines.append("Load: smtp-source, one new connection per message, one recipient. "
                 "msgs/s = accepted / smtp-source wall time. CPU = the contender's process tree "
                 "(Postfix: master and all its daemons) from the start of the run until the "
                 "downstream sink has every accepted message; the downstream sink is not counted. "
                 "Ratios are median / median. Loopback, 2 shared cores: compare within one run only.")
    lines += ["", "| contender | ok runs | msgs/s min | median | max | vs smtp-sink | vs postfix "
              "| CPU ms/msg | accept-phase CPU ms/msg | end-to-end msgs/s | delivered/accepted |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
        acc = sum(r["accepted"] for r in results)
        dlv = sum(min(r["delivered"], r["accepted"]) for r in results)
        complete = sum(1 for r in results if r["delivered"] >= r["accepted"] == r["messages"])
        cpu = median([r["cpu_ms_per_msg"] for r in ok])
        cpu_acc = median([r["cpu_accept_ms_per_msg"] for r in ok])
        e2e = median([r["end_to_end_msgs_per_s"] for r in ok])
        dcell = f"{dlv}/{acc} ({complete}/{len(all_runs)} runs complete)" if results else "n/a"
        lines.append("| " + " | ".join([
            name, f"{len(ok)}/{len(all_runs)}",
            fmt_rate(min(vals)) if vals else "n/a", fmt_rate(med),
            fmt_rate(max(vals)) if vals else "n/a",
            fmt(ratio("smtp-sink"), "{:.2f}x"), fmt(ratio("postfix"), "{:.2f}x"),
            fmt(cpu, "{:.3f}"), fmt(cpu_acc, "{:.3f}"), fmt_rate(e2e), dcell]) + " |")
        summary[name] = {
            "runs": len(all_runs), "ok": len(ok),
            "msgs_per_s": {"min": min(vals) if vals else None, "median": med,
                           "max": max(vals) if vals else None},
            "vs_smtp_sink": ratio("smtp-sink"), "vs_postfix": ratio("postfix"),
            "cpu_ms_per_msg": cpu, "cpu_accept_ms_per_msg": cpu_acc,
            "end_to_end_msgs_per_s": e2e, "accepted": acc, "delivered": dlv,
            "complete_runs": complete,
            "failures": [s["failure"] for s in all_runs.values() if s["failure"]],
        }
    notes = [f"{n}: {summary[n]['failures'][0]}" for n in contenders if summary[n]["failures"]]
    if notes:
        lines += ["", "n/a / failed runs (first reason): " + "; ".join(f"`{n}`" for n in notes)]
    lines += ["", "For smtp-sink, delivered = its own message counter and end-to-end = acceptance; "
              "for postfix and ringmail, delivered = messages the downstream smtp-sink received "
              "within the drain timeout.", ""]
    with open(a.md, "w") as f:
        f.write("\n".join(lines))
    with open(a.json, "w") as f:
        json.dump({"meta": a.meta, "machine": a.machine, "summary": summary, "runs": raw}, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_cpu)
    p = sub.add_parser("tree")
    p.add_argument("pid", type=int)
    p.set_defaults(fn=cmd_tree)
    p = sub.add_parser("fsync")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_fsync)
    p = sub.add_parser("result")
    p.add_argument("--out", required=True)
    p.add_argument("--contender", required=True)
    for k in ("round", "messages", "sessions", "size", "source-rc", "accepted", "delivered", "alive"):
        p.add_argument(f"--{k}", type=int, required=True)
    for k in ("t0", "t1", "t2", "cpu0", "cpu1", "cpu2"):
        p.add_argument(f"--{k}", type=float, required=True)
    p.add_argument("--source-err", default="")
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
    a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
