"""Starling protocol conformance: the golden vectors and the documented flows, checked by
an independent client written from protocol/README.md and the .proto alone.

    python3 protocol/conformance/run.py [--starling target/debug/starling]

Prints one PASS or FAIL line per check and exits non-zero if any failed.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from vectors import check_all  # noqa: E402
import changes  # noqa: E402
import disappearing  # noqa: E402
import flows  # noqa: E402
import keys  # noqa: E402
import presence  # noqa: E402
import media  # noqa: E402
import push  # noqa: E402
import wire  # noqa: E402


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, fn):
        t0 = time.monotonic()
        try:
            detail = fn()
        except Exception as e:  # a failed expectation or a broken connection alike
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            return
        self.passed += 1
        ms = (time.monotonic() - t0) * 1000
        extra = f" ({detail})" if isinstance(detail, str) else ""
        print(f"PASS {name}{extra} [{ms:.0f} ms]", flush=True)


def main():
    root = os.path.dirname(os.path.dirname(HERE))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starling", default=os.environ.get(
        "STARLING_BIN", os.path.join(root, "target", "debug", "starling")),
        help="the server binary (default: $STARLING_BIN or target/debug/starling)")
    ap.add_argument("--vectors-only", action="store_true", help="skip the server flows")
    args = ap.parse_args()

    pb = wire.generate_python(os.path.join(HERE, "..", "proto"))
    results = Results()
    check_all(pb, os.path.join(HERE, "..", "tests", "vectors"), results.check)
    if not args.vectors_only:
        if not os.access(args.starling, os.X_OK):
            print(f"FAIL server: {args.starling} is not an executable (build it first)")
            results.failed += 1
        else:
            flows.run_all(pb, args.starling, results.check)
            changes.run_all(pb, args.starling, results.check)
            disappearing.run_all(pb, args.starling, results.check)
            presence.run_all(pb, args.starling, results.check)
            media.run_all(pb, args.starling, results.check)
            keys.run_all(pb, args.starling, results.check)
            push.run_all(pb, args.starling, results.check)
    print(f"{results.passed} passed, {results.failed} failed")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
