#!/usr/bin/env python3
"""CPU time and sleeps per durable write on this machine's disk.

    taskset -c 0 python3 bench/scripts/fsync_cost.py DIR MODE BYTES [OPS]

MODE is `buffered` (pwrite + fdatasync), `odirect` (O_DIRECT pwrite + fdatasync) or
`odirect-dsync` (O_DIRECT pwritev2 with RWF_DSYNC). Writes OPS (default 3000) sequential
blocks of BYTES into a 64 MiB zero-filled file in DIR (removed afterwards) and prints ops/s,
CPU µs per op and voluntary context switches per op. Its result decided the log's commit
interval (docs/design/performance-decisions.md, "Commit interval").
"""
import mmap
import os
import resource
import sys
import time

SIZE = 64 << 20


def main():
    d, mode, ws = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ops = int(sys.argv[4]) if len(sys.argv) > 4 else 3000
    path = os.path.join(d, "fsync_cost.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    zeros = b"\0" * (1 << 20)
    for off in range(0, SIZE, 1 << 20):
        os.pwrite(fd, zeros, off)
    os.fsync(fd)
    os.close(fd)
    try:
        flags = os.O_RDWR | (os.O_DIRECT if mode.startswith("odirect") else 0)
        fd = os.open(path, flags)
        buf = mmap.mmap(-1, ws)  # page-aligned, as O_DIRECT needs
        buf.write(b"x" * ws)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        off = 0
        for _ in range(ops):
            if mode == "odirect-dsync":
                os.pwritev(fd, [buf], off, os.RWF_DSYNC)
            else:
                os.pwritev(fd, [buf], off)
                os.fdatasync(fd)
            off = off + ws if off + 2 * ws <= SIZE else 0
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        os.close(fd)
    finally:
        os.unlink(path)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    print(
        f"{mode:14s} {ws:6d} B: {ops / (t1 - t0):6.0f} ops/s, "
        f"cpu {cpu / ops * 1e6:5.1f} us/op, "
        f"voluntary switches {(r1.ru_nvcsw - r0.ru_nvcsw) / ops:.2f}/op"
    )


if __name__ == "__main__":
    main()
