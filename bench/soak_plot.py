#!/usr/bin/env python3
"""Plots the memory of each service over a soak run (videocall-bench soak --json)."""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("soak_json")
    ap.add_argument("png")
    a = ap.parse_args()
    with open(a.soak_json) as f:
        doc = json.load(f)
    r = doc["result"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in sorted({s["process"] for s in r["samples"]}):
        pts = [s for s in r["samples"] if s["process"] == name]
        ax.plot([p["t_s"] for p in pts], [p["rss_kib"] / 1024 for p in pts], label=name)
    step = r["step"]
    rec = r.get("records") or {}
    ax.set_title(
        f"soak: {step['offered_rate']:.0f} calls/s, {step['completed']} calls, "
        f"{rec.get('complete', 0)} complete records"
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)


if __name__ == "__main__":
    main()
