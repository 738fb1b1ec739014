#!/usr/bin/env python3
"""Kernel CPU per TCP segment over loopback, the two ends pinned to different cores.

    python3 bench/scripts/tcp_cost.py [ROUND_TRIPS] [FRAME_BYTES] [FRAMES_PER_SEGMENT]

One connection (TCP_NODELAY). The client sends FRAMES_PER_SEGMENT frames of
FRAME_BYTES in one `send` and waits for the same back; the server (a forked
process) echoes. Each end blocks in `recv`, so every segment wakes a sleeping
peer on the other core: the unbatched case of a chat server whose clients
send one message at a time. Defaults: 50,000 round trips, 150-byte frames,
one frame per segment.

Prints, for each end, the system (kernel) CPU per segment it sent or
received and per frame, taken from getrusage. The user time is Python's and
is not part of the answer. It measures the floor of what loopback TCP costs a
message on this machine (docs/design/performance-decisions.md, "Why 5× Mosquitto
at 100 and 1,000 pairs does not fit this machine").
"""
import os
import resource
import socket
import sys
import time


def recv_exact(s, n):
    got = 0
    while got < n:
        b = s.recv(n - got)
        if not b:
            raise SystemExit("peer closed")
        got += len(b)


def report(who, r0, r1, trips, frames):
    segs = 2 * trips  # one segment in, one out, per round trip
    sys_us = 1e6 * (r1.ru_stime - r0.ru_stime)
    print(
        f"{who}: kernel {sys_us / segs:.2f} us per segment sent or received, "
        f"{sys_us / (segs * frames):.2f} us per frame; "
        f"voluntary switches per segment {(r1.ru_nvcsw - r0.ru_nvcsw) / segs:.2f}"
    )


def server(port_w, trips, size, cpu):
    os.sched_setaffinity(0, {cpu})
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    os.write(port_w, ls.getsockname()[1].to_bytes(2, "big"))
    os.close(port_w)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = b"y" * size
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(trips):
        recv_exact(c, size)
        c.sendall(out)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return r0, r1


def main():
    trips = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    frame = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    frames = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    size = frame * frames
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        r0, r1 = server(w, trips, size, 0)
        report("server (core 0)", r0, r1, trips, frames)
        sys.stdout.flush()
        os._exit(0)
    os.close(w)
    port = int.from_bytes(os.read(r, 2), "big")
    os.sched_setaffinity(0, {1})
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = b"x" * size
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(trips):
        s.sendall(out)
        recv_exact(s, size)
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    report("client (core 1)", r0, r1, trips, frames)
    print(f"round trip {1e6 * (t1 - t0) / trips:.1f} us ({trips} round trips, {size} bytes each way)")


if __name__ == "__main__":
    main()
