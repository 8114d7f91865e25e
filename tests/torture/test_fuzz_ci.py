"""Hostile input, the CI run: coverage-guided fuzzing (atheris, i.e. libFuzzer) of every parser in the table of
`test_fuzz_parsers.py`, at least AGW_FUZZ_CI_INPUTS inputs per parser (default 100,000, also in `make test`).

The hypothesis tests in `test_fuzz_parsers.py` stay: they shrink a failure to a readable input. This run is the
volume: each parser is fuzzed by `fuzz_ci_worker.py` in its own process (the slowest parsers split into several
independent runs with their own libFuzzer seed), AGW_FUZZ_CI_WORKERS processes at a time (default: one per
core). Every input is checked exactly as there: the parser's declared errors are a rejection, anything else is a
crash, reported with the input (hex) and the traceback, and fails the test. A parser that did not get its
inputs (a worker killed, hung past libFuzzer's per-input timeout, or exiting early) fails the test too.

Reproduce a run with AGW_FUZZ_CI_SEED=<seed from the figures or the failure>; iterate locally with fewer inputs,
e.g. AGW_FUZZ_CI_INPUTS=5000. `make torture` (AGW_TORTURE=long) runs 1,000,000 per parser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.torture.conftest import LONG, record
from tests.torture.test_fuzz_parsers import PARSERS

if importlib.util.find_spec("atheris") is None and (platform.machine(), sys.platform) != ("x86_64", "linux"):
    # The test extra installs atheris wherever it publishes wheels (x86_64 Linux, where CI runs); elsewhere, e.g.
    # on a Raspberry Pi, building it needs clang's libFuzzer. The hypothesis fuzz tests run everywhere.
    pytest.skip(f"atheris has no wheel for {platform.machine()}", allow_module_level=True)

INPUTS = int(os.environ.get("AGW_FUZZ_CI_INPUTS", "1000000" if LONG else "100000"))
WORKERS = int(os.environ.get("AGW_FUZZ_CI_WORKERS", str(os.cpu_count() or 2)))
SEED = int(os.environ.get("AGW_FUZZ_CI_SEED", str(random.randrange(1, 2**31))))
WORKER_TIMEOUT_S = 1800  # one worker; the whole run takes a few minutes on 2 cores
ROOT = Path(__file__).resolve().parents[2]

# Seconds per 100,000 inputs (a run of 2026-11-22 on the loaded 2-core box, process start included): the runs
# start longest first so that the workers finish together. Parsers not listed: about 3 s.
COST = {"mls_group_process": 108, "config": 36, "pairwise_batch_decrypt": 14, "pairwise_decrypt": 12,
        "pairwise_accept": 10, "mls_message": 9, "prekey_bundle": 8, "client_link": 7, "relay_token": 5}
# Runs per parser: MLS processing in three independent runs so that it does not decide the wall clock alone.
SHARDS = {"mls_group_process": 3}


@dataclass(frozen=True)
class Run:
    parser: str
    shard: int
    inputs: int
    seed: int


def _runs() -> list[Run]:
    runs = []
    for name in PARSERS:
        k = SHARDS.get(name, 1)
        per = -(-INPUTS // k)  # ceil: the shards together run at least INPUTS
        runs += [Run(name, i, per, SEED + 1000 * i + len(runs)) for i in range(k)]
    return sorted(runs, key=lambda r: -COST.get(r.parser, 3) * r.inputs)


def _fuzz(run: Run, workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = workdir / f"{run.parser}-{run.shard}.json"
    log = workdir / f"{run.parser}-{run.shard}.log"
    t0 = time.monotonic()
    with log.open("wb") as fh:
        try:
            rc: int | str = subprocess.run(
                [sys.executable, "-m", "tests.torture.fuzz_ci_worker", run.parser, str(run.inputs), str(run.seed),
                 str(out)], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S,
                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {WORKER_TIMEOUT_S} s"
    text = log.read_text(errors="replace")
    try:
        figures = json.loads(out.read_text())
    except (OSError, ValueError):
        figures = {"inputs": 0, "rejected": 0, "accepted": 0, "known_bug": 0, "crashes": 0, "crash_reports": []}
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    return {**figures, "run": run, "rc": rc, "wall": time.monotonic() - t0, "log": log, "log_tail": text[-3000:],
            "cov": int(cov[-1][0]) if cov else 0, "ft": int(cov[-1][1]) if cov else 0}


def _problems(name: str, results: list[dict[str, Any]], inputs: int) -> list[str]:
    """What fails the run for one parser: crashes (input in hex, traceback), a worker that did not run all its
    inputs, fewer inputs in total than required."""
    problems = []
    for r in results:
        for rep in r["crash_reports"][:3]:
            problems.append(f"{name} (seed {r['run'].seed}): {rep['exception']}\n  input (hex): {rep['input_hex']}\n"
                            f"{rep['traceback']}")
        if r["crashes"] and not r["crash_reports"]:
            problems.append(f"{name} (seed {r['run'].seed}): {r['crashes']} crashes")
        if r["rc"] != 0 or r["inputs"] < r["run"].inputs:
            problems.append(f"{name} (seed {r['run'].seed}): worker exit {r['rc']} after {r['inputs']} of "
                            f"{r['run'].inputs} inputs; log {r['log']}:\n{r['log_tail']}")
    if sum(r["inputs"] for r in results) < inputs:
        problems.append(f"{name}: {sum(r['inputs'] for r in results)} inputs, fewer than {inputs}")
    return problems


def test_ci_fuzzer_reports_an_undeclared_exception(tmp_path: Path) -> None:
    """The machinery itself: a stand-in parser with a planted undeclared exception is reported as a crash, with
    the input in hex and the traceback, and the worker still runs all its inputs."""
    result = _fuzz(Run("selftest_planted_crash", 0, 2000, SEED), tmp_path)
    assert result["rc"] == 0 and result["inputs"] == 2000, result["log_tail"]
    assert result["crashes"] > 0 and result["rejected"] + result["crashes"] == 2000
    report = result["crash_reports"][0]
    assert report["exception"] == "KeyError: 'planted'"
    assert len(bytes.fromhex(report["input_hex"])) % 7 == 3
    assert "raise KeyError(\"planted\")" in report["traceback"]
    problems = _problems("selftest_planted_crash", [result], 2000)
    assert problems and "input (hex): " + report["input_hex"] in problems[0]


def test_ci_fuzzer_reports_a_hang(tmp_path: Path) -> None:
    """A stand-in parser that hangs on some inputs: libFuzzer's per-input timeout stops the worker, and the run
    is reported as a problem (not counted as done), with the hanging input saved next to the figures."""
    result = _fuzz(Run("selftest_planted_hang", 0, 2000, SEED), tmp_path, env={"AGW_FUZZ_CI_TIMEOUT": "2"})
    assert result["rc"] != 0 and result["inputs"] < 2000, result["log_tail"]
    assert "ALARM: working on the last Unit for" in result["log_tail"]
    saved = list(tmp_path.glob("selftest_planted_hang-timeout-*"))
    assert len(saved) == 1 and len(saved[0].read_bytes()) % 7 == 3
    problems = _problems("selftest_planted_hang", [result], 2000)
    assert any("worker exit" in p for p in problems) and any("fewer than 2000" in p for p in problems)


def test_every_parser_fuzzed_in_ci(tmp_path: Path) -> None:
    runs = _runs()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(WORKERS, 1)) as pool:
        results = list(pool.map(lambda r: _fuzz(r, tmp_path), runs))
    wall = time.monotonic() - t0

    problems: list[str] = []
    for name in sorted(PARSERS):
        mine = [r for r in results if r["run"].parser == name]
        total = {k: sum(r[k] for r in mine) for k in ("inputs", "rejected", "accepted", "known_bug", "crashes")}
        record(f"fuzz_ci.{name}", **total, runs=len(mine), seconds=round(sum(r["wall"] for r in mine), 1),
               coverage_edges=max(r["cov"] for r in mine), coverage_features=max(r["ft"] for r in mine))
        problems += _problems(name, mine, INPUTS)
    record("fuzz_ci", parsers=len(PARSERS), inputs_per_parser=INPUTS, workers=WORKERS, seed=SEED,
           inputs=sum(r["inputs"] for r in results), crashes=sum(r["crashes"] for r in results),
           wall_seconds=round(wall, 1))
    assert not problems, f"{len(problems)} problem(s) (AGW_FUZZ_CI_SEED={SEED}):\n\n" + "\n\n".join(problems[:8])
