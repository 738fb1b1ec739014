#!/usr/bin/env python3
"""How long this machine takes cores away from a program that never blocks.

    python3 bench/scripts/hiccups.py [--json FILE] [SECONDS] [CPU ...]

One process per CPU (default: every CPU this process may use), pinned there,
reads the monotonic clock in a tight loop and counts every gap between two reads
longer than 50 µs: time in which the core ran something else (an interrupt, a
kernel thread, another process or, on a virtual machine, the host). Run it on an
otherwise idle machine: it measures the noise floor under any latency figure
taken here (a 4 ms gap on the server's core is a 4 ms stall for every message
in flight, and a queue that needs time to drain afterwards). It spins, so it
uses each CPU it watches for the whole run; never run it beside a benchmark.
`bench/compare.sh` runs it for 5 s before its ladder and records the result in
compare.json (`machine_noise`) and under its table.
"""

import argparse
import json
import os
import time
from multiprocessing import Pool

BUCKETS_US = [50, 200, 500, 1000, 2000, 5000]


def watch(args):
    cpu, seconds = args
    os.sched_setaffinity(0, {cpu})
    clock = time.perf_counter_ns
    counts = [0] * len(BUCKETS_US)
    lost = longest = 0
    end = clock() + int(seconds * 1e9)
    prev = clock()
    while True:
        t = clock()
        gap = t - prev
        prev = t
        if gap > 50_000:
            lost += gap
            longest = max(longest, gap)
            i = 0
            while i + 1 < len(BUCKETS_US) and gap > BUCKETS_US[i + 1] * 1000:
                i += 1
            counts[i] += 1
        if t > end:
            return cpu, counts, lost, longest


def main():
    ap = argparse.ArgumentParser(description="Gaps in a spinning process's view of the clock, per CPU.")
    ap.add_argument("seconds", nargs="?", type=float, default=20.0)
    ap.add_argument("cpus", nargs="*", type=int)
    ap.add_argument("--json", help="also write the numbers here")
    a = ap.parse_args()
    seconds = a.seconds
    cpus = a.cpus or sorted(os.sched_getaffinity(0))
    with Pool(len(cpus)) as pool:
        results = sorted(pool.map(watch, [(c, seconds) for c in cpus]))
    ms = [b / 1000 for b in BUCKETS_US]
    heads = [f"{a:g}-{b:g} ms" for a, b in zip(ms, ms[1:])] + [f">{ms[-1]:g} ms"]
    print(f"{seconds:g} s per CPU; gaps between two clock reads, by length:")
    print("cpu  " + "  ".join(f"{h:>8}" for h in heads) + "   longest    lost")
    for cpu, counts, lost, longest in results:
        row = "  ".join(f"{n:>8}" for n in counts)
        print(f"{cpu:<4} {row}  {longest / 1e6:6.2f} ms  {100 * lost / (seconds * 1e9):5.2f}%")
    if a.json:
        out = {
            "tool": "bench/scripts/hiccups.py",
            "seconds_per_cpu": seconds,
            "cpus": [
                {
                    "cpu": cpu,
                    "gaps": dict(zip(heads, counts)),
                    "gaps_over_1ms": sum(n for b, n in zip(BUCKETS_US, counts) if b >= 1000),
                    "longest_ms": round(longest / 1e6, 3),
                    "lost_percent": round(100 * lost / (seconds * 1e9), 3),
                }
                for cpu, counts, lost, longest in results
            ],
        }
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
