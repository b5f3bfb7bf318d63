#!/usr/bin/env python3
"""Turns the JSON of one benchmark run (Kamailio/SIPp, tonic echo, the call
service's ramps, the floor relay's ramp and idle connections) into one markdown report with a table
of ratios and PNG plots."""

import argparse
import json
import os


def load(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def fmt(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return "—" if not a or not b else f"{a / b:.2f}×"


def plots(ramps, out_dir):
    """ramps: [(label, ramp JSON)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, ramp), style in zip(ramps, ("-", "--", ":")):
        steps = sorted(ramp["result"]["steps"], key=lambda s: s["offered_rate"])
        rates = [s["offered_rate"] for s in steps]
        for (key, name), color in zip((("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("p999_ms", "p99.9")),
                                      ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            ax.plot(rates, [s["request_to_start"][key] for s in steps], style, marker="o", markersize=3,
                    color=color, label=f"{name}, {label}")
        for s in steps:
            if not s["clean"]:
                ax.axvline(s["offered_rate"], color="red", alpha=0.15, linestyle=style)
    ax.set_xlabel("offered rate (calls/s)")
    ax.set_ylabel("REQUEST→START (ms)")
    ax.set_yscale("log")
    ax.set_title("Call set-up latency against offered rate (red lines: steps with failures)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    path = os.path.join(out_dir, "latency-vs-rate.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    files.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, ramp), style in zip(ramps, ("-", "--", ":")):
        t0 = 0
        for n, s in enumerate(ramp["result"]["steps"]):
            per = s.get("per_second", [])
            ax.plot(range(t0, t0 + len(per)), per, style, color="tab:green" if s["clean"] else "tab:red",
                    label=label if n == 0 else None)
            t0 += len(per) + 1
    ax.set_xlabel("time (s, ramp steps back to back)")
    ax.set_ylabel("completed calls/s")
    ax.set_title("Throughput against time during the ramps (red: step with failures)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "throughput-vs-time.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    files.append(path)
    return files


def ramp_section(w, title, r):
    w(f"\n## {title}\n\n")
    w("Each step offers calls open loop for a few seconds; a step is clean when every call started on time, ")
    w("every event both sides received was the one the contract says, and no notice to the business service was dropped.\n\n")
    service = "floor-relay" if any(p[0] == "floor-relay" for s in r["steps"] for p in s["processes"]) else "call-service"
    w(f"| offered/s | completed/s | clean | failed | not started | notices dropped | REQUEST→START p50 ms | p99 | p99.9 | {service} CPU s | business-service CPU s | load generator CPU s |\n")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    for s in r["steps"]:
        procs = dict((p[0], p[1]) for p in s["processes"])
        w(f"| {s['offered_rate']:.0f} | {s['completed_per_s']:.0f} | {'yes' if s['clean'] else 'no'} | {s['failed']} | {s['not_started']} | "
          f"{s['notices_dropped']:.0f} | {s['request_to_start']['p50_ms']:.3f} | {s['request_to_start']['p99_ms']:.3f} | "
          f"{s['request_to_start']['p999_ms']:.3f} | {procs.get(service, {}).get('cpu_s', 0):.2f} | "
          f"{procs.get('business-service', {}).get('cpu_s', 0):.2f} | {s.get('generator_cpu_s', 0):.2f} |\n")
        if s["failures"]:
            for what, n in s["failures"].items():
                w(f"| | | | {n} × {what} | | | | | | | | |\n")
    for key, what in (("at_half", "services started afresh"),
                      ("at_half_after_ramp", "right after the ramp, same processes")):
        half = r.get(key)
        if not half:
            continue
        runs = r.get("at_half_p99_ms", []) if key == "at_half" else []
        if len(runs) > 1:
            what += f"; REQUEST→START p99 of each of {len(runs)} such runs: " + ", ".join(f"{p:.3f}" for p in runs) + " ms; below, the median run"
        w(f"\n### At half the highest clean rate ({half['offered_rate']:.0f} calls/s offered; {what})\n\n")
        w("| latency (ms) | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|\n")
        for key, label in (("request_to_reply", "REQUEST→REPLY"), ("request_to_start", "REQUEST→START"),
                           ("request_to_ring", "REQUEST→callee rings"), ("finish_to_finished", "FINISH→both FINISHed")):
            p = half[key]
            w(f"| {label} | {p['p50_ms']:.3f} | {p['p90_ms']:.3f} | {p['p99_ms']:.3f} | {p['p999_ms']:.3f} | {p['max_ms']:.3f} |\n")
        w("\n| process | CPU s | RSS MiB | peak RSS MiB |\n|---|---:|---:|---:|\n")
        for name, c in half["processes"]:
            w(f"| {name} | {c['cpu_s']:.2f} | {c['rss_kib'] / 1024:.1f} | {c['peak_rss_kib'] / 1024:.1f} |\n")



def conn_label(c):
    n = c.get("shared_connections", 0)
    return "each its own connection" if not n else f"streams over {n} shared connections"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kamailio")
    ap.add_argument("--echo")
    ap.add_argument("--ramp", required=True)
    ap.add_argument("--ramp-shared", help="the ramp with devices sharing connections")
    ap.add_argument("--ramp-floor", help="the ramp through the floor relay (no call state)")
    ap.add_argument("--ramp-no-records", help="the ramp with the business service keeping no records")
    ap.add_argument("--calls-records", help="calls at one rate, records on (production)")
    ap.add_argument("--calls-no-records", help="the same calls, records off")
    ap.add_argument("--soak", help="videocall-bench soak, records on")
    ap.add_argument("--connections")
    ap.add_argument("--connections-shared", help="idle clients whose streams share connections")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--command", default="./scripts/bench.sh")
    args = ap.parse_args()

    kam = load(args.kamailio)
    echo = load(args.echo)
    ramp = load(args.ramp)
    conns = load(args.connections)
    conns_shared = load(args.connections_shared)
    shared = load(args.ramp_shared)
    floor = load(args.ramp_floor)
    floor_rate = floor["result"].get("max_clean_completed_per_s") if floor else None
    floor_offered = floor["result"].get("max_clean_rate") if floor else None
    shared_offered = shared["result"].get("max_clean_rate") if shared else None
    shared_rate = shared["result"].get("max_clean_completed_per_s") if shared else None
    shared_half = shared["result"].get("at_half") if shared else None
    r = ramp["result"]
    # Rates compared are what completed per second in the highest clean step
    # (its offered rate is shown next to it), the same for every system.
    ours_offered = r.get("max_clean_rate")
    ours = r.get("max_clean_completed_per_s")
    half = r.get("at_half")
    kam_plain = kam["plain"]["max_clean_completed_per_s"] if kam else None
    kam_dialog = kam["dialog"]["max_clean_completed_per_s"] if kam else None
    kam_plain_offered = kam["plain"]["max_clean_rate"] if kam else None
    kam_dialog_offered = kam["dialog"]["max_clean_rate"] if kam else None

    m = ramp["machine"]
    out = []
    w = out.append
    w("# Benchmark report\n")
    w(f"Produced by `{args.command}`: every process on one machine, in one run.\n")
    w(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}.")
    if kam:
        kv = kam["kamailio_version"].removeprefix("version: ").strip()
        sv = kam["sipp_version"].strip().rstrip(".")
        w(f" Kamailio: {kv}; SIPp: {sv}.")
    w("\n\n## Side by side\n\n")
    w("Rates: calls completed per second in the highest step with zero failed calls (offered rate in brackets).\n\n")
    w("| system | highest rate with zero failures | call service ÷ it (own connections) | call service ÷ it (shared connections) |\n|---|---:|---:|---:|\n")
    w(f"| **call service**, each device its own HTTP/2 connection: full call (REQUEST, approval by the business service, REPLY, START, FINISH; notices on) | **{fmt(ours)} calls/s** ({fmt(ours_offered)}) | | |\n")
    if shared:
        w(f"| **call service**, devices' streams over 8 shared HTTP/2 connections (as behind an HTTP/2 proxy; SIPp too sends every call over one socket) | **{fmt(shared_rate)} calls/s** ({fmt(shared_offered)}) | | |\n")
    if floor:
        w(f"| floor: the same clients and calls through a relay that keeps no call state (`--floor`: forwards each control to the device it names; approval by the business service; no notices), each device its own connection | {fmt(floor_rate)} calls/s ({fmt(floor_offered)}) | {ratio(ours, floor_rate)} | |\n")
    if kam:
        w(f"| Kamailio stateful proxy (tm, record-route), SIPp UAC ↔ UAS over UDP | {fmt(kam_plain)} calls/s ({fmt(kam_plain_offered)}) | {ratio(ours, kam_plain)} | {ratio(shared_rate, kam_plain)} |\n")
        w(f"| Kamailio stateful proxy + dialog tracking | {fmt(kam_dialog)} calls/s ({fmt(kam_dialog_offered)}) | {ratio(ours, kam_dialog)} | {ratio(shared_rate, kam_dialog)} |\n")
    if echo:
        best = {}
        for e in echo["result"]:
            if e["errors"] == 0 and e["per_s"] > best.get(e["kind"], {"per_s": 0})["per_s"]:
                best[e["kind"]] = e
        for kind, label in (("unary", "tonic echo, unary"), ("stream", "tonic echo, bidirectional stream ping-pong")):
            if kind in best:
                b = best[kind]
                w(f"| {label} (transport limit; {b['concurrency']} in flight over {b['connections']} connections) | {fmt(b['per_s'])} round trips/s | | |\n")
    w("\nA call through the call service is 3 controls with their results and 7 events on the clients' streams, ")
    w("1 approval (a unary RPC) and 3 notices (batched with other calls' notices under load) to the business service; ")
    w("a SIP call through the proxy is 7 SIP messages in, 7 out (INVITE, 100, 180, 200, ACK, BYE, 200).\n")

    w("\n## Targets\n\n| target | measured | met |\n|---|---|---|\n")
    after = {"own connections": r.get("at_half_after_ramp"),
             "shared connections": shared["result"].get("at_half_after_ramp") if shared else None}
    runs = {"own connections": r.get("at_half_p99_ms", []),
            "shared connections": shared["result"].get("at_half_p99_ms", []) if shared else []}
    for label, rate, h in (("own connections", ours, half), ("shared connections", shared_rate, shared_half)):
        if kam_plain and rate:
            bound = ""
            if label == "own connections" and floor_rate:
                bound = f"; the floor relay with the same clients: {floor_rate / kam_plain:.2f}×"
            w(f"| ≥ 2.5× Kamailio's best clean rate ({label}) | {rate / kam_plain:.2f}× ({fmt(rate)} vs {fmt(kam_plain)}){bound} | {'yes' if rate >= 2.5 * kam_plain else 'no'} |\n")
        if h:
            p99 = h["request_to_start"]["p99_ms"]
            a = after[label]
            later = f" (right after the ramp, same processes: {a['request_to_start']['p99_ms']:.3f} ms)" if a else ""
            each = runs[label]
            median = f"median of {len(each)} runs ({', '.join(f'{p:.3f}' for p in each)} ms): " if len(each) > 1 else ""
            w(f"| REQUEST→START p99 ≤ 2 ms at half the max rate ({label}, {fmt(h['offered_rate'])}/s, services started afresh) | {median}{p99:.3f} ms{later} | {'yes' if p99 <= 2.0 else 'no'} |\n")
    idle = [(conn_label(d["result"]), d["result"]) for d in (conns, conns_shared) if d]
    for label, c in idle:
        w(f"| ≤ 16 KiB server memory per idle client ({label}) | {c['server_kib_per_client']:.2f} KiB | {'yes' if c['server_kib_per_client'] <= 16 else 'no'} |\n")
    for label, c in idle:
        w(f"| 100,000 idle clients on one node ({label}) | {c['connected']:,} connected of {c['clients']:,} asked | {'yes' if c['connected'] >= 100000 and c['failed'] == 0 else 'no'} |\n")

    norec = load(args.ramp_no_records)
    crec, cnorec = load(args.calls_records), load(args.calls_no_records)
    if norec or (crec and cnorec):
        w("\n## Call records: the production configuration against records off\n\n")
        w("The business service keeps call records (SQLite) by default; every figure above is with records on. Side by side, same run:\n\n")
        w("| figure | records on (default) | records off (`--no-records`) | target | met |\n|---|---:|---:|---|---|\n")
        if norec:
            on, off = r.get("max_clean_completed_per_s"), norec["result"].get("max_clean_completed_per_s")
            met = "yes" if on and off and on >= 0.9 * off else "no"
            w(f"| highest clean rate, own connections | {fmt(on)} calls/s | {fmt(off)} calls/s | ≥ 90 % of records off | {met} ({ratio(on, off)}) |\n")
        if crec and cnorec:
            a, b = crec["result"], cnorec["result"]
            pa, pb = a["request_to_start"]["p99_ms"], b["request_to_start"]["p99_ms"]
            w(f"| REQUEST→START p50 at {fmt(a['offered_rate'])} calls/s | {a['request_to_start']['p50_ms']:.2f} ms | {b['request_to_start']['p50_ms']:.2f} ms | | |\n")
            w(f"| REQUEST→START p99 at {fmt(a['offered_rate'])} calls/s | {pa:.2f} ms | {pb:.2f} ms | within 1 ms of records off | {'yes' if pa <= pb + 1.0 else 'no'} |\n")
            ca = dict(a["processes"]).get("business-service", {}).get("cpu_s")
            cb = dict(b["processes"]).get("business-service", {}).get("cpu_s")
            if ca and cb:
                per_a, per_b = 1000 * ca / a["completed"], 1000 * cb / b["completed"]
                w(f"| business-service CPU per call | {per_a:.3f} ms | {per_b:.3f} ms | ≤ 2× records off | {'yes' if per_a <= 2 * per_b else 'no'} ({per_a / per_b:.2f}×) |\n")
    soak = load(args.soak)
    if soak:
        s = soak["result"]
        rec = s.get("records") or {}
        w(f"\n## Soak (records on)\n\n{s['step']['offered_rate']:.0f} calls/s for {s['step']['elapsed_s']:.0f} s, mixed outcomes: ")
        w(f"{s['step']['completed']:,} calls completed, {rec.get('calls', 0):,} call records, {rec.get('complete', 0):,} complete: ")
        w(f"**{'every call has a complete record' if s['every_record_complete'] else 'NOT every call has a complete record'}**. ")
        for name in sorted({x["process"] for x in s["samples"]}):
            pts = [x["rss_kib"] / 1024 for x in s["samples"] if x["process"] == name]
            if pts:
                w(f"{name} RSS {pts[0]:.1f} → {pts[-1]:.1f} MiB (max {max(pts):.1f}). ")
        w("Memory over time: `soak.png`.\n")
    ramp_section(w, "Call service ramp (each device its own connection)", r)
    if shared:
        ramp_section(w, "Call service ramp (devices over 8 shared connections)", shared["result"])
    if floor:
        ramp_section(w, "Floor relay ramp (same clients, each its own connection; no call state, no notices)", floor["result"])

    if kam:
        w("\n## Kamailio steps\n\n| mode | offered/s | completed/s | clean | ok | failed | Kamailio CPU s |\n|---|---:|---:|---|---:|---:|---:|\n")
        for mode in ("plain", "dialog"):
            for s in kam[mode]["steps"]:
                w(f"| {mode} | {s['offered_rate']:.0f} | {s['completed_per_s']:.0f} | {'yes' if s['clean'] else 'no'} | {s['successful']} | {s['failed']} | {s['kamailio_cpu_s']:.2f} |\n")

    if echo:
        w("\n## tonic echo (transport baseline)\n\n| kind | connections | in flight | round trips/s | p50 ms | p99 ms | server CPU s | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for e in echo["result"]:
            w(f"| {e['kind']} | {e['connections']} | {e['concurrency']} | {e['per_s']:.0f} | {e['latency']['p50_ms']:.3f} | {e['latency']['p99_ms']:.3f} | {e['server_cpu_s']:.2f} | {e['errors']} |\n")

    if idle:
        w("\n## Idle clients\n\n| figure | " + " | ".join(label for label, _ in idle) + " |\n|---|" + "---:|" * len(idle) + "\n")
        rows = [
            ("clients asked / connected / failed", lambda c: f"{c['clients']:,} / {c['connected']:,} / {c['failed']}"),
            ("source addresses", lambda c: f"{c['sources']}"),
            ("time to connect all", lambda c: f"{c['connect_s']:.1f} s ({c['connects_per_s']:.0f}/s)"),
            ("devices the service reports", lambda c: f"{c['server_reports_connected']:,.0f}"),
            ("call-service RSS before / with all connected", lambda c: f"{c['server_rss_before_kib'] / 1024:.1f} / {c['server_rss_connected_kib'] / 1024:.1f} MiB"),
            ("**server memory per idle client**", lambda c: f"**{c['server_kib_per_client']:.2f} KiB**"),
            ("calls put in the talking state", lambda c: f"{c['active_calls']:,}"),
            ("server memory per active call", lambda c: f"{c['server_kib_per_call']:.2f} KiB"),
            ("load generator memory per client", lambda c: f"{c['generator_kib_per_client']:.2f} KiB"),
        ]
        for name, f in rows:
            w(f"| {name} | " + " | ".join(f(c) for _, c in idle) + " |\n")
        for label, c in idle:
            for e in c.get("first_errors", []):
                w(f"\nError ({label}): `{e}`\n")

    try:
        ramps = [("own connections", ramp)] + ([("8 shared connections", shared)] if shared else []) \
            + ([("floor relay", floor)] if floor else [])
        files = plots(ramps, args.out_dir)
        w("\n## Plots\n\n")
        for f in files:
            w(f"![{os.path.basename(f)}]({os.path.basename(f)})\n\n")
    except ImportError:
        w("\n(matplotlib is not installed: no plots.)\n")

    path = os.path.join(args.out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("".join(out))
    print(path)


if __name__ == "__main__":
    main()
