"""Run `agw` under cProfile with the event-loop thread's CPU clock, and write the profile when it exits.

`python -m cProfile` times with the wall clock. Under uvloop the wait in epoll happens in C below the outermost
coroutine, so an idle gateway's time showed up as own time of `daemon.py run` (3.4-3.8 of ~5.7 s in the tenth
session's report). With `time.thread_time` the profile holds only CPU spent on the loop thread; what is left as
own time of `run` is C code that runs no Python frame (uvloop, libuv, the C task steps).

Usage: python bench/profiled_gateway.py OUT.prof run --config FILE
"""

from __future__ import annotations

import cProfile
import sys
import time


def main(argv: list[str]) -> int:
    out, rest = argv[0], argv[1:]
    from gateway.cli import main as agw

    prof = cProfile.Profile(time.thread_time)
    code = 1
    try:
        code = prof.runcall(agw, rest)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        prof.dump_stats(out)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
