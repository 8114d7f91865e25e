"""One coverage-guided atheris (libFuzzer) run over one parser of the table in `test_fuzz_parsers.PARSERS`.

Started by `test_fuzz_ci.py`, one process per (parser, shard):

    python -m tests.torture.fuzz_ci_worker NAME RUNS SEED OUT.json

The project's code (`gateway`, `hsm`) is imported under atheris instrumentation, so libFuzzer sees which
branches an input reached and keeps the inputs that reach new ones. The genuine seeds of the table are the
starting corpus. Every input is checked as in the hypothesis test: the parser's declared errors are a rejection,
an entry of `KNOWN_BUGS` counts as `known_bug`, anything else is a crash, recorded with its input (hex) and
traceback. An input that runs longer than AGW_FUZZ_CI_TIMEOUT seconds (default 30) makes libFuzzer stop the run
with an error (the input is saved next to OUT.json). The run does not stop at a crash (the figures count them
all; the test fails on any). The figures are written to OUT.json every 1,000 inputs and after the last one;
libFuzzer then exits the process itself (Python's atexit handlers do not run), printing its own final
statistics to stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

MAX_CRASH_REPORTS = 10  # full reports kept per run (all crashes are counted)


def _restoring_group_process(table: Any) -> Callable[[bytes], object]:
    """`Group.process` on the same group state for every input: the state is restored from a snapshot (the
    persistence encoding) before each input, so an input that the group accepts (an application message, a
    proposal) does not change what the next input meets. Same code under test as the table's harness, but
    deterministic, which coverage guidance needs."""
    from gateway.protocol.mls.group_persist import group_from_bytes, group_to_bytes

    member = table._mls_b
    snapshot = group_to_bytes(member.g)

    def run(data: bytes) -> object:
        group = group_from_bytes(snapshot, member.signer, member.config)
        return group.process(data)

    return run


# Harnesses that replace the table's function for one parser (same parser code, cheaper or deterministic).
HARNESSES: dict[str, Callable[[Any], Callable[[bytes], object]]] = {
    "mls_group_process": _restoring_group_process,
}


def _planted_crash(data: bytes) -> None:
    """Not a parser of ours: the self-test's stand-in with a planted bug (an undeclared KeyError for every input
    whose length is 3 modulo 7, a declared error otherwise), which the CI fuzzer must report as a crash."""
    from gateway.protocol.errors import ProtocolError

    if len(data) % 7 == 3:
        raise KeyError("planted")
    raise ProtocolError("rejected")


def _planted_hang(data: bytes) -> None:
    """The self-test's stand-in for a parser that hangs on some inputs (length 3 modulo 7)."""
    from gateway.protocol.errors import ProtocolError

    if len(data) % 7 == 3:
        time.sleep(3600)
    raise ProtocolError("rejected")


def _entry(name: str, table: Any) -> tuple[Callable[[bytes], object], list[bytes], tuple[type[Exception], ...]]:
    if name == "selftest_planted_crash":
        from gateway.protocol.errors import ProtocolError

        return _planted_crash, [b"seed"], (ProtocolError,)
    if name == "selftest_planted_hang":
        from gateway.protocol.errors import ProtocolError

        return _planted_hang, [b"seed"], (ProtocolError,)
    fn, seeds, declared = table.PARSERS[name]
    return (HARNESSES[name](table) if name in HARNESSES else fn), seeds, declared


def main(argv: list[str]) -> None:
    name, runs, seed, out = argv[1], int(argv[2]), int(argv[3]), Path(argv[4])
    if Path("/dev/shm").is_dir():
        # The config harness writes its file for every input; on ext4 a truncate-and-rewrite waits for the disk
        # (auto_da_alloc), which made that parser I/O-bound. The table takes its directory from tempfile.
        tempfile.tempdir = "/dev/shm"
    with atheris.instrument_imports(include=["gateway", "hsm"]):
        from tests.torture import test_fuzz_parsers as table

    fn, seeds, declared = _entry(name, table)
    known = table.KNOWN_BUGS.get(name, ((), ""))[0]
    stats = {"inputs": 0, "rejected": 0, "accepted": 0, "known_bug": 0, "crashes": 0}
    reports: list[dict[str, str]] = []
    t0 = time.monotonic()

    def one_input(data: bytes) -> None:
        stats["inputs"] += 1
        try:
            fn(data)
            outcome = "accepted"
        except declared:
            outcome = "rejected"
        except known:
            outcome = "known_bug"
        except Exception as exc:  # anything undeclared is the finding
            outcome = "crashes"
            if len(reports) < MAX_CRASH_REPORTS:
                reports.append({"exception": f"{type(exc).__name__}: {exc}"[:500], "input_hex": data.hex(),
                                "traceback": traceback.format_exc()})
        stats[outcome] += 1
        if stats["inputs"] % 1000 == 0 or stats["inputs"] >= runs:
            write_figures()
        if stats["inputs"] >= runs:
            shutil.rmtree(table._CONFIG_DIR, ignore_errors=True)  # the last input: atexit handlers do not run

    def write_figures() -> None:
        out.write_text(json.dumps({"parser": name, "seed": seed, **stats,
                                   "seconds": round(time.monotonic() - t0, 1), "crash_reports": reports}))

    corpus = out.with_suffix(".corpus")  # the seeds, and what libFuzzer adds to them
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(s)
    max_len = max(1024, max(len(s) for s in seeds) + 512)
    atheris.Setup([argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={max_len}", "-len_control=0",
                   f"-timeout={os.environ.get('AGW_FUZZ_CI_TIMEOUT', '30')}", "-rss_limit_mb=2048",
                   "-print_final_stats=1",
                   f"-artifact_prefix={out.parent}/{name}-",  # a hang or out-of-memory input lands next to OUT
                   str(corpus)], one_input)
    atheris.Fuzz()  # libFuzzer exits the process after RUNS inputs


if __name__ == "__main__":
    main(sys.argv)
