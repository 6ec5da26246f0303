#!/usr/bin/env python3
"""Summarise a bench/lb.sh run directory into a markdown table and one JSON file.

Per test and proxy: min/median/max of the primary metric over the repeats,
and median-based ratios against `direct` and `haproxy`. Failed or missing
runs are shown as n/a.
"""

import argparse
import glob
import json
import os
import statistics

# test -> (title, primary metric key, unit, higher_is_better, extra columns)
# extra columns: (header, function(result) -> float or None, format)
def lat(key):
    return lambda r: (r.get("latency") or {}).get(key)


def get(key):
    return lambda r: r.get(key)


TESTS = {
    "bulk1": ("Bulk upload, 1 stream", "gbit_s", "Gbit/s", True,
              [("proxy CPU s/GiB", get("proxy_cpu_s_per_gib"), "{:.3f}")]),
    "bulk8": ("Bulk upload, 8 streams", "gbit_s", "Gbit/s", True,
              [("proxy CPU s/GiB", get("proxy_cpu_s_per_gib"), "{:.3f}")]),
    "bulkdown": ("Bulk download, 1 stream", "gbit_s", "Gbit/s", True,
                 [("proxy CPU s/GiB", get("proxy_cpu_s_per_gib"), "{:.3f}")]),
    "connrate": ("Connection rate (connect, 64 B echo, close)", "conns_per_s", "conn/s", True,
                 [("p50 us", lat("p50_us"), "{:.0f}"), ("p99 us", lat("p99_us"), "{:.0f}"),
                  ("p99.9 us", lat("p999_us"), "{:.0f}"), ("proxy CPU s", get("proxy_cpu_s"), "{:.2f}")]),
    "rr": ("Request/response, kept-alive (64 B / 64 B)", "requests_per_s", "req/s", True,
           [("p50 us", lat("p50_us"), "{:.0f}"), ("p99 us", lat("p99_us"), "{:.0f}"),
            ("p99.9 us", lat("p999_us"), "{:.0f}"), ("proxy CPU s", get("proxy_cpu_s"), "{:.2f}")]),
    "idle": ("Idle connections: proxy RSS per connection", "bytes_per_conn", "bytes/conn", False,
             [("established", get("established"), "{:.0f}"), ("alive after", get("alive_after"), "{:.0f}"),
              ("proxy fds", get("fds_after"), "{:.0f}")]),
}


def fmt(v, f="{:.2f}"):
    return "n/a" if v is None else f.format(v)


def fmt_primary(v):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--tests", required=True)
    ap.add_argument("--proxies", required=True)
    ap.add_argument("--meta", default="")
    a = ap.parse_args()
    tests = a.tests.split()
    proxies = a.proxies.split()

    # results[test][proxy] = list of (round, result dict or None, failure reason)
    results = {}
    raw = []
    for path in sorted(glob.glob(os.path.join(a.run_dir, "*--*--r*.*"))):
        name = os.path.basename(path)
        stem, ext = os.path.splitext(name)
        if ext not in (".json", ".fail"):
            continue
        test, proxy, rnd = stem.split("--")
        rnd = int(rnd[1:])
        if ext == ".json":
            try:
                with open(path) as f:
                    r = json.load(f)
            except (OSError, ValueError) as e:
                r, reason = None, f"unreadable result: {e}"
            else:
                reason = None
        else:
            with open(path) as f:
                r, reason = None, f.read().strip()
        results.setdefault(test, {}).setdefault(proxy, []).append((rnd, r, reason))
        raw.append({"test": test, "proxy": proxy, "round": rnd, "result": r, "failure": reason})

    summary = {}
    lines = [f"# Load balancer side-by-side ({os.path.basename(a.run_dir)})", ""]
    lines.append(f"Parameters: `{a.meta}`")
    lines.append("")
    lines.append("Loopback only; client, proxy and server share the same cores, so absolute "
                 "numbers are noisy and only ratios within one run are meaningful. "
                 "Ratios are median(proxy) / median(reference).")
    for test in tests:
        if test not in TESTS:
            continue
        title, key, unit, higher, extras = TESTS[test]
        better = "higher is better" if higher else "lower is better"
        lines += ["", f"## {title}", "", f"Primary metric: {unit} ({better})", ""]
        hdr = ["proxy", "ok runs", "min", "median", "max", "vs direct", "vs haproxy"]
        hdr += [h for h, _, _ in extras] + ["errors"]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
        per = results.get(test, {})
        meds = {}
        for proxy in proxies:
            runs = per.get(proxy, [])
            meds[proxy] = median([r.get(key) for _, r, _ in runs if r is not None])
        summary[test] = {}
        for proxy in proxies:
            runs = per.get(proxy, [])
            if not runs:
                continue  # test not applicable to this proxy
            ok = [r for _, r, _ in runs if r is not None]
            vals = [r[key] for r in ok if r.get(key) is not None]
            med = meds[proxy]

            def ratio(ref):
                m = meds.get(ref)
                if med is None or not m or proxy == ref:
                    return None
                if test == "idle" and ref == "direct":
                    return None
                return med / m

            errs = sum(int(r.get("errors") or 0) for r in ok)
            fails = [why for _, r, why in runs if r is None]
            row = [proxy, f"{len(ok)}/{len(runs)}",
                   fmt_primary(min(vals)) if vals else "n/a",
                   fmt_primary(med),
                   fmt_primary(max(vals)) if vals else "n/a",
                   fmt(ratio("direct"), "{:.2f}x"), fmt(ratio("haproxy"), "{:.2f}x")]
            extra_meds = {}
            for h, fn, f in extras:
                m = median([fn(r) for r in ok])
                extra_meds[h] = m
                row.append(fmt(m, f))
            row.append(str(errs))
            lines.append("| " + " | ".join(row) + " |")
            summary[test][proxy] = {
                "unit": unit, "runs": len(runs), "ok": len(ok),
                "min": min(vals) if vals else None, "median": med,
                "max": max(vals) if vals else None,
                "vs_direct": ratio("direct"), "vs_haproxy": ratio("haproxy"),
                "extras": extra_meds, "errors": errs, "failures": fails,
            }
        notes = [f"{p}: {summary[test][p]['failures'][0]}" for p in proxies
                 if summary[test].get(p, {}).get("failures")]
        if notes:
            lines += ["", "n/a / failed runs (first reason): " + "; ".join(f"`{n}`" for n in notes)]
        if test == "idle":
            lines += ["", "Direct has no proxy, so its RSS column is n/a; "
                      "`established`/`alive after` confirm the connections were real."]
    lines.append("")
    with open(a.md, "w") as f:
        f.write("\n".join(lines))
    with open(a.json, "w") as f:
        json.dump({"meta": a.meta, "summary": summary, "runs": raw}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
