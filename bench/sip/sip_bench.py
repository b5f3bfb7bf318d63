#!/usr/bin/env python3
"""Kamailio as a stateful proxy between a SIPp UAC and a SIPp UAS: the
highest call rate with zero failed calls, with and without dialog tracking.

Each step starts Kamailio and the UAS afresh, runs the UAC at one rate for a
fixed number of calls and counts it clean when SIPp reports every call
successful and the calls were placed at the offered rate. The rate rises by
a factor until a step fails, then bisects, as the call service's ramp does.

A call is INVITE / 100 / 180 / (10 ms ring) / 200 / ACK / BYE / 200, every
message through the proxy (record-route). Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = ("127.0.0.1", 5060)
UAS = ("127.0.0.1", 5070)
UAC_PORT = 5061
BUFF = str(16 * 1024 * 1024)


def scenarios(dirname):
    """The built-in SIPp scenarios, made to follow a record-routed path, and
    a UAS that rings 10 ms (with two proxy workers, a 180 sent together with
    its 200 can overtake it)."""
    uac = subprocess.run(["sipp", "-sd", "uac"], capture_output=True, text=True).stdout
    uas = subprocess.run(["sipp", "-sd", "uas"], capture_output=True, text=True).stdout
    uac = uac.replace('<recv response="200" rtd="true">', '<recv response="200" rtd="true" rrs="true">')
    for method in ("ACK", "BYE"):
        uac = uac.replace(f"{method} sip:[service]@[remote_ip]:[remote_port] SIP/2.0", f"{method} [next_url] SIP/2.0")
    # A route set on the in-dialog requests (the line vanishes when empty).
    uac = re.sub(r"(\n(\s*)Call-ID: \[call_id\]\n)", r"\1\2[routes]\n", uac)
    uas = uas.replace("[last_CSeq:]\n", "[last_CSeq:]\n      [last_Record-Route:]\n")
    ring_end = uas.index("</send>") + len("</send>")
    uas = uas[:ring_end] + '\n\n  <pause milliseconds="10"/>\n' + uas[ring_end:]
    paths = {}
    for name, text in (("uac", uac), ("uas", uas)):
        paths[name] = os.path.join(dirname, f"{name}.xml")
        with open(paths[name], "w") as f:
            f.write(text)
    return paths


def udp_listening(port):
    with open("/proc/net/udp") as f:
        next(f)
        return any(line.split()[1].endswith(f":{port:04X}") for line in f)


def wait_udp(port, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if udp_listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on UDP {port}")


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def group_pids(pgid):
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def stop(p):
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def step(rate, seconds, dialog, paths, workdir, limit):
    calls = max(1, int(round(rate * seconds)))
    cfg = os.path.join(HERE, "kamailio.cfg")
    kam_cmd = ["kamailio", "-f", cfg, "-DD", "-E", "-m", "1024", "-M", "64", "-w", workdir]
    if dialog:
        kam_cmd += ["-A", "WITH_DIALOG"]
    logs = {n: open(os.path.join(workdir, f"{n}.log"), "w") for n in ("kamailio", "uas", "uac")}
    kam = start(kam_cmd, logs["kamailio"])
    uas = None
    try:
        wait_udp(PROXY[1], "kamailio")
        uas = start(["sipp", "-sf", paths["uas"], "-i", UAS[0], "-p", str(UAS[1]), "-buff_size", BUFF,
                     "-nostdin", "-max_recv_loops", "10000", "-max_sched_loops", "10000"], logs["uas"])
        wait_udp(UAS[1], "sipp uas")
        kam_pids = group_pids(kam.pid)
        cpu0 = cpu_seconds(kam_pids)
        stat = os.path.join(workdir, "uac_stat.csv")
        if os.path.exists(stat):
            os.remove(stat)
        t0 = time.monotonic()
        uac = subprocess.run(
            ["sipp", "-sf", paths["uac"], f"{PROXY[0]}:{PROXY[1]}", "-i", "127.0.0.1", "-p", str(UAC_PORT),
             "-s", "bench", "-r", str(int(rate)), "-rp", "1000", "-m", str(calls), "-l", str(limit),
             "-d", "0", "-buff_size", BUFF, "-nostdin", "-trace_stat", "-stf", stat, "-fd", "1",
             "-max_recv_loops", "10000", "-max_sched_loops", "10000", "-timeout", str(int(seconds * 4 + 30))],
            stdout=logs["uac"], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        elapsed = time.monotonic() - t0
        kam_cpu = cpu_seconds(kam_pids) - cpu0
        kam_rss = rss_kib(kam_pids)
        ok, failed = parse_stat(stat)
    finally:
        if uas:
            stop(uas)
        stop(kam)
        for f in logs.values():
            f.close()
    # SIPp paces starts at the rate; a UAC that could not keep up took longer.
    on_time = elapsed <= calls / rate * 1.05 + 0.5
    clean = uac.returncode == 0 and ok == calls and failed == 0 and on_time
    result = {
        "offered_rate": rate,
        "calls": calls,
        "successful": ok,
        "failed": failed,
        "sipp_exit": uac.returncode,
        "elapsed_s": elapsed,
        "completed_per_s": ok / elapsed if elapsed > 0 else 0.0,
        "on_time": on_time,
        "clean": clean,
        "kamailio_cpu_s": kam_cpu,
        "kamailio_rss_kib": kam_rss,
    }
    print(f"kamailio{' +dialog' if dialog else ''} {rate:>7.0f}/s: {'clean' if clean else 'NOT clean'}"
          f" — {ok}/{calls} ok, {failed} failed, {elapsed:.1f} s, kamailio CPU {kam_cpu:.2f} s", file=sys.stderr)
    return result


def parse_stat(path):
    """Successful and failed calls (cumulative) from the last line of SIPp's
    statistics file."""
    try:
        with open(path) as f:
            lines = [l.rstrip("\n") for l in f if l.strip()]
    except OSError:
        return 0, -1
    if len(lines) < 2:
        return 0, -1
    head = lines[0].split(";")
    last = lines[-1].split(";")
    row = dict(zip(head, last))
    return int(row.get("SuccessfulCall(C)", 0)), int(row.get("FailedCall(C)", 0))


def ramp(dialog, args, paths, workdir):
    steps = []
    good = bad = None
    rate = args.start_rate
    while rate <= args.max_rate:
        s = step(rate, args.step_seconds, dialog, paths, workdir, args.limit)
        steps.append(s)
        if s["clean"]:
            good = (rate, s["completed_per_s"])
            rate = round(rate * args.factor)
        else:
            bad = rate
            break
    if good and bad:
        for _ in range(args.refine):
            lo, hi = good[0], bad
            if hi - lo < lo * 0.03:
                break
            mid = round((lo + hi) / 2)
            s = step(mid, args.step_seconds, dialog, paths, workdir, args.limit)
            steps.append(s)
            if s["clean"]:
                good = (mid, s["completed_per_s"])
            else:
                bad = mid
    return {
        "dialog": dialog,
        "steps": steps,
        "max_clean_rate": good[0] if good else None,
        "max_clean_completed_per_s": good[1] if good else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start-rate", type=float, default=500)
    ap.add_argument("--factor", type=float, default=1.4)
    ap.add_argument("--max-rate", type=float, default=100000)
    ap.add_argument("--step-seconds", type=float, default=5)
    ap.add_argument("--refine", type=int, default=3)
    ap.add_argument("--limit", type=int, default=10000, help="SIPp's concurrent call limit")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    for tool in ("kamailio", "sipp"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install kamailio sip-tester)")
    with tempfile.TemporaryDirectory(prefix="sipbench-") as workdir:
        paths = scenarios(workdir)
        results = {
            "kamailio_version": subprocess.run(["kamailio", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
            "sipp_version": subprocess.run(["sipp", "-v"], capture_output=True, text=True).stdout.strip().splitlines()[0],
            "plain": ramp(False, args, paths, workdir),
            "dialog": ramp(True, args, paths, workdir),
        }
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    for k in ("plain", "dialog"):
        print(f"kamailio {k}: highest clean rate {results[k]['max_clean_rate']} calls/s", file=sys.stderr)


if __name__ == "__main__":
    main()
