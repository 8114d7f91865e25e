"""`python -m bench --quick` end to end: every part runs on real processes and the report is well formed.

The figures themselves are not asserted (benchmarks are never timed tests); what is asserted is that the harness
measures both paths, loses nothing, and turns the figures into a complete table with a verdict per target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text()


def test_both_paths_carry_every_message(quick):
    r, _ = quick
    for path in ("ours", "bridge"):
        (row,) = r["throughput"][path]
        assert row["size"] == 256 and row["n"] == 200
        assert row["received"] == 200 and row["lost"] == 0 and row["duplicates"] == 0
        assert row["msg_s"] > 0
        assert row["cpu_s"] and all(v["main"] >= 0 and v["other"] >= 0 for v in row["cpu_s"].values())
        rt = r["rtt"][path]
        assert rt["n"] == 50 and rt["lost"] == 0 and 0 < rt["p50_ms"] <= rt["p99_ms"]
    assert {"relay", "gateway bench-a", "gateway bench-b"} <= set(r["throughput"]["ours"][0]["cpu_s"])
    (one,) = r["throughput"]["rounds_256"]["rounds"]  # --quick: one round
    assert one["ratio"] == r["throughput"]["rounds_256"]["median_ratio"] > 0
    assert r["errors"] == {}


def test_rounds_are_summarised_by_the_median_ratio():
    from bench.__main__ import median_row, rounds_summary

    def run(msg_s: int) -> dict[str, int]:
        return {"msg_s": msg_s}

    rounds = [{"bridge": run(1000), "ours": run(450)}, {"bridge": run(2000), "ours": run(1000)},
              {"bridge": run(1000), "ours": run(520)}, {"bridge": None, "ours": run(9999)}]
    got = rounds_summary(rounds)
    assert [x["ratio"] for x in got["rounds"]] == [0.45, 0.5, 0.52]  # (a round with a failed side is left out)
    assert got["median_ratio"] == 0.5
    assert rounds_summary(rounds[:2])["median_ratio"] == 0.475
    assert median_row([run(3), run(1), run(2)]) == run(2) and median_row([run(4), run(1)]) == run(1)


def test_other_parts_are_measured(quick):
    r, _ = quick
    assert r["relay"]["micro"]["batched_envelopes_per_s"] > 0
    conns = r["relay"]["connections"]
    assert conns["held"] == conns["connections_target"] == 20 and conns["failed"] == 0
    gw = r["gateway"]
    assert 0 < gw["rss_idle_mb"] <= gw["rss_load_mb"]
    assert gw["cold_start"]["cold_start_s"] > 0
    assert r["mls"]["members"] == 20 and r["mls"]["protect_unprotect_1k_us"] > 0
    assert r["slim"]["status"].startswith("not measured")


def test_the_round_trip_floor_sums_the_parts_measured_alone(quick):
    r, md = quick
    floor = r["rtt_floor"]
    bx, dc = floor["broker_exchange"], floor["durable_commit"]
    assert bx["n"] == 50 and bx["lost"] == 0 and 0 < bx["p50_ms"] <= bx["p99_ms"]
    assert dc["n"] == 100 and 0 < dc["p50_ms"] <= dc["p99_ms"]
    relay = r["relay"]["micro"]["rtt_ms_median"]
    assert floor["floor_p50_ms"] == round(2 * bx["p50_ms"] + 4 * dc["p50_ms"] + relay, 3)
    assert f"**{floor['floor_p50_ms']:,.2f} ms** before any gateway work" in md


def test_the_floor_needs_every_part():
    from bench.rtt_floor import floor_ms

    parts = {"broker_exchange": {"p50_ms": 0.3}, "durable_commit": {"p50_ms": 0.25}}
    assert floor_ms(parts, 0.5) == 2.1
    assert floor_ms(parts, None) is None
    assert floor_ms({"broker_exchange": {"n": 0, "lost": 5}, "durable_commit": {"p50_ms": 0.25}}, 0.5) is None


def test_table_has_a_verdict_for_every_target(quick):
    r, md = quick
    names = {t["name"] for t in r["targets"]}
    assert {"throughput 256 B vs Mosquitto TLS bridge", "messages lost, ours", "round trip p50, ours",
            "relay routed envelopes/s", "gateway RSS under load", "gateway cold start to ready (SoftHSM)"} <= names
    for t in r["targets"]:
        assert t["status"] in ("PASS", "MISS", "n/a")
        assert f"| {t['name']} | {t['target']} | {t['value']} | {t['status']} |" in md
    assert "| 256 B | 200 |" in md


def test_checks_compare_against_the_targets():
    base = {"throughput": {"ours": [{"size": 256, "n": 10, "msg_s": 600, "lost": 0}],
                           "bridge": [{"size": 256, "n": 10, "msg_s": 1000, "lost": 1}]},
            "slim": {"throughput": [{"size": 256, "msg_s": 400}]},
            "rtt": {"ours": {"n": 10, "p50_ms": 1.5, "p99_ms": 7.0}}}
    got = {c.name: c.status for c in report.checks(base)}
    assert got["throughput 256 B vs Mosquitto TLS bridge"] == "PASS"  # 0.6x >= 0.5x
    assert got["throughput 256 B vs bridge (stretch)"] == "MISS"
    assert got["throughput 256 B vs SLIM (MLS)"] == "MISS"  # 1.5x < 2x
    assert got["messages lost, ours"] == "PASS" and got["messages lost, bridge"] == "MISS"
    assert got["round trip p50, ours"] == "PASS" and got["round trip p99, ours"] == "MISS"
    # Interleaved rounds: the verdict is the median of the per-round ratios, not the ratio of the median runs.
    rounds = {**base, "throughput": {**base["throughput"], "rounds_256": {"median_ratio": 0.45, "rounds": []}}}
    got = {c.name: (c.status, c.value) for c in report.checks(rounds)}
    assert got["throughput 256 B vs Mosquitto TLS bridge"] == ("MISS", "0.45x")
    unmeasured = {c.name: c.status for c in report.checks({"slim": {"status": "not available: no wheel"}})}
    assert unmeasured == {"throughput 256 B vs SLIM (MLS)": "n/a"}


def test_the_cpu_budget_sums_every_process_and_the_clients():
    row = {"n": 1000, "seconds": 0.5, "client_cpu_s": {"publisher": 0.02, "subscriber": 0.03},
           "cpu_s": {"relay": {"main": 0.004, "other": 0.0}, "gateway bench-a": {"main": 0.04, "other": 0.001},
                     "gateway bench-b": {"main": 0.07, "other": 0.0}, "mosquitto bench-a": {"main": 0.02, "other": 0},
                     "mosquitto bench-b": {"main": 0.03, "other": 0.0}}}
    b = report.cpu_budget(row, 2)
    assert b is not None
    assert {k: round(v, 1) for k, v in b["us_per_message"].items()} == {
        "relay": 4.0, "gateways": 111.0, "brokers": 50.0, "clients": 50.0}
    assert round(b["total_us"], 1) == 215.0 and b["wall_us"] == 1000.0 and round(b["busy"], 3) == 0.215
    assert report.cpu_budget({**row, "client_cpu_s": None}, 2) is None
    assert report.cpu_budget(row, None) is None


def test_the_quick_run_reports_the_clients_cpu(quick):
    r, md = quick
    for path in ("ours", "bridge"):
        (row,) = r["throughput"][path]
        assert row["client_cpu_s"]["publisher"] > 0 and row["client_cpu_s"]["subscriber"] > 0
    assert "Where the machine's CPU goes per 256 B message" in md
    assert md.count("total **") == 2
