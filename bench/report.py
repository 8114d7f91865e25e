"""Targets of issue 7 and the MLS issue, checked against measured figures, and the markdown table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    value: str
    status: str  # PASS, MISS or n/a (with the reason in value)

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "target": self.target, "value": self.value, "status": self.status}


def _cmp(name: str, target: str, value: float | None, ok: bool | None, fmt: str = "{:,.2f}") -> Check:
    if value is None or ok is None:
        return Check(name, target, "not measured", "n/a")
    return Check(name, target, fmt.format(value), "PASS" if ok else "MISS")


def _tput(r: dict[str, Any], path: str, size: int) -> dict[str, Any] | None:
    for row in r.get("throughput", {}).get(path, []):
        if row.get("size") == size:
            return row  # type: ignore[no-any-return]
    return None


def checks(r: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    ours, bridge = _tput(r, "ours", 256), _tput(r, "bridge", 256)
    slim = r.get("slim", {})
    slim256 = next((t for t in slim.get("throughput", []) if t.get("size") == 256), None)
    if ours and slim256 and slim256.get("msg_s"):
        ratio = ours["msg_s"] / slim256["msg_s"]
        out.append(_cmp("throughput 256 B vs SLIM (MLS)", ">= 2.0x", ratio, ratio >= 2.0, "{:.2f}x"))
    else:
        out.append(Check("throughput 256 B vs SLIM (MLS)", ">= 2.0x", slim.get("status", "not measured"), "n/a"))
    if ours and bridge and bridge.get("msg_s"):
        # With interleaved rounds: the median of the ratios taken within each round (bench/__main__.py).
        median = (r.get("throughput", {}).get("rounds_256") or {}).get("median_ratio")
        ratio = median if median is not None else ours["msg_s"] / bridge["msg_s"]
        out.append(_cmp("throughput 256 B vs Mosquitto TLS bridge", ">= 0.5x", ratio, ratio >= 0.5, "{:.2f}x"))
        out.append(_cmp("throughput 256 B vs bridge (stretch)", ">= 1.0x", ratio, ratio >= 1.0, "{:.2f}x"))
    for path in ("ours", "bridge"):
        rows = r.get("throughput", {}).get(path, [])
        if rows:
            lost = sum(int(x.get("lost", 0)) for x in rows)
            out.append(_cmp(f"messages lost, {path}", "0", lost, lost == 0, "{:,.0f}"))
    rt = r.get("rtt", {}).get("ours")
    if rt and rt.get("n"):
        out.append(_cmp("round trip p50, ours", "<= 2 ms", rt["p50_ms"], rt["p50_ms"] <= 2.0, "{:.2f} ms"))
        out.append(_cmp("round trip p99, ours", "<= 5 ms", rt["p99_ms"], rt["p99_ms"] <= 5.0, "{:.2f} ms"))
    relay = r.get("relay", {})
    micro = relay.get("micro") or {}
    if micro.get("batched_envelopes_per_s"):
        v = micro["batched_envelopes_per_s"]
        out.append(_cmp("relay routed envelopes/s", ">= 50,000", v, v >= 50_000, "{:,.0f}"))
    conns = relay.get("connections") or {}
    if conns.get("held") is not None:
        out.append(_cmp("relay connections held", f">= {conns['connections_target']:,}", conns["held"],
                        conns["held"] >= conns["connections_target"], "{:,.0f}"))
        if conns.get("bytes_per_connection") is not None:
            kib = conns["bytes_per_connection"] / 1024
            out.append(_cmp("relay memory per connection", "<= 64 KiB", kib, kib <= 64, "{:,.1f} KiB"))
    gw = r.get("gateway", {})
    if gw.get("rss_load_256_mb") is not None:
        v = gw["rss_load_256_mb"]
        out.append(_cmp("gateway RSS under load", "<= 60 MB", v, v <= 60, "{:.1f} MB (peak, 256 B run)"))
    if gw.get("rss_load_mb") is not None:
        v = gw["rss_load_mb"]
        out.append(_cmp("gateway RSS, every run (1 KiB, 16 KiB, round trips)", "<= 60 MB", v, v <= 60,
                        "{:.1f} MB (peak)"))
    if gw.get("cold_start", {}).get("cold_start_s") is not None:
        v = gw["cold_start"]["cold_start_s"]
        out.append(_cmp("gateway cold start to ready (SoftHSM)", "<= 1.5 s", v, v <= 1.5, "{:.2f} s"))
    grp = r.get("groups") or {}
    if grp.get("deliveries_expected") is not None:
        out.append(_cmp(f"group fan-out lost ({grp['members']} agents, {grp['gateways']} gateways)", "0",
                        grp["lost"], grp["lost"] == 0, "{:,.0f}"))
    mls = r.get("mls", {})
    if mls.get("members"):
        m = mls["members"]
        note = "" if m == 1000 else f" ({m} members, quick run)"
        out.append(_cmp(f"MLS commit adding {m - 1} members{note}", "< 1.5 s", mls["add_commit_s"],
                        mls["add_commit_s"] < 1.5, "{:.3f} s"))
        out.append(_cmp(f"MLS process a commit at {m} members", "< 20 ms", mls["process_commit_ms"],
                        mls["process_commit_ms"] < 20, "{:.2f} ms"))
        out.append(_cmp("MLS protect + unprotect 1 KiB", "< 200 us", mls["protect_unprotect_1k_us"],
                        mls["protect_unprotect_1k_us"] < 200, "{:.0f} us"))
    return out


def cpu_budget(row: dict[str, Any], cores: int | None) -> dict[str, Any] | None:
    """CPU microseconds per message of a throughput run, by kind of process (gateways, brokers, relay, the load
    clients), against the wall time the machine's cores offered per message."""
    cpu, clients, n, seconds = row.get("cpu_s"), row.get("client_cpu_s"), row.get("n"), row.get("seconds")
    if not cpu or not clients or not n or not seconds or not cores:
        return None
    kinds: dict[str, float] = {}
    for name, v in cpu.items():
        kind = ("gateways" if name.startswith("gateway") else "brokers" if name.startswith("mosquitto")
                else name)
        kinds[kind] = kinds.get(kind, 0.0) + v["main"] + v["other"]
    kinds["clients"] = clients["publisher"] + clients["subscriber"]
    per = {k: v * 1e6 / n for k, v in kinds.items()}
    total = sum(per.values())
    wall = seconds * cores * 1e6 / n
    return {"us_per_message": per, "total_us": total, "wall_us": wall, "busy": total / wall}


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v}{unit}"


def _load(r: dict[str, Any]) -> str:
    start, end = r["meta"].get("load_average_start"), r["meta"].get("load_average_end")
    return f"{start[0]:.1f} at start, {end[0]:.1f} at end" if start and end else "?"


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Benchmark results ({r['meta']['mode']} run, {r['meta']['started']})", "",
             f"Machine: {r['meta']['machine']}; load average (1 min) {_load(r)}. Everything on loopback, side by "
             "side in one run; absolute figures move with the machine's load, the ratios much less.", ""]
    lines += ["## Throughput, agent to agent, QoS 1 (paho clients, TCP_NODELAY)", "",
              "| size | messages | ours msg/s | ours lost | bridge msg/s | bridge lost | SLIM (MLS) msg/s "
              "| ours/bridge | ours/SLIM |", "|---|---|---|---|---|---|---|---|---|"]
    slim = {t["size"]: t for t in r.get("slim", {}).get("throughput", [])}
    bridge = {t["size"]: t for t in r.get("throughput", {}).get("bridge", [])}
    median_ratio = (r.get("throughput", {}).get("rounds_256") or {}).get("median_ratio")
    for o in r.get("throughput", {}).get("ours", []):
        b, s = bridge.get(o["size"], {}), slim.get(o["size"], {})
        rb = f"{o['msg_s'] / b['msg_s']:.2f}x" if b.get("msg_s") else "-"
        if o["size"] == 256 and median_ratio is not None:
            rb = f"{median_ratio:.2f}x"  # (the median of the per-round ratios: the target's figure)
        rs = f"{o['msg_s'] / s['msg_s']:.2f}x" if s.get("msg_s") else "-"
        lines.append(f"| {o['size']:,} B | {o['n']:,} | {_fmt(o.get('msg_s'))} | {_fmt(o.get('lost'))} | "
                     f"{_fmt(b.get('msg_s'))} | {_fmt(b.get('lost'))} | {_fmt(s.get('msg_s'))} | {rb} | {rs} |")
    rounds = r.get("throughput", {}).get("rounds_256") or {}
    if len(rounds.get("rounds", [])) > 1:
        per = "; ".join(f"{x['ours_msg_s']:,} / {x['bridge_msg_s']:,} = {x['ratio']:.2f}x" for x in rounds["rounds"])
        lines.append(f"\n256 B in {len(rounds['rounds'])} interleaved rounds (ours / bridge msg/s, alternating which "
                     f"goes first): {per}. The table shows the median run of each side; the target's ratio is the "
                     f"median of the per-round ratios, {rounds['median_ratio']:.2f}x.")
    for o in r.get("throughput", {}).get("ours", []):
        counters = o.get("gateway_counters") or {}
        dups = sum(c.get("duplicates", 0) for c in counters.values())
        if dups:
            lines.append(f"\nOurs, {o['size']:,} B: the receiving gateway saw {dups:,} duplicate deliveries "
                         f"(sender retransmissions before the end-to-end ACK arrived) for {o['n']:,} messages.")
    lines += ["", "CPU seconds per process during each run (main thread + other threads; for a gateway the main "
              "thread is the asyncio loop, the others are the store's and the token's helper threads, if any):", ""]
    for path in ("ours", "bridge"):
        for o in r.get("throughput", {}).get(path, []):
            cpu = o.get("cpu_s") or {}
            if cpu:
                parts = ", ".join(f"{name} {v['main']:.2f}+{v['other']:.2f}" for name, v in cpu.items())
                lines.append(f"- {path} {o['size']:,} B ({o['n']:,} msgs, {_fmt(o.get('seconds'))} s): {parts}")
    cores = r.get("meta", {}).get("cores")
    budget = [(path, cpu_budget(o, cores)) for path in ("ours", "bridge")
              for o in r.get("throughput", {}).get(path, []) if o.get("size") == 256]
    if any(b for _, b in budget):
        lines += ["", "Where the machine's CPU goes per 256 B message (CPU seconds / messages: the paths' processes "
                      "over the whole run, warm-up and session set-up included, which weighs in short runs; the load "
                      "clients, the same paho publisher and subscriber on both paths, over the measured burst):", ""]
        for path, b in budget:
            if b:
                parts = ", ".join(f"{k} {v:.1f} us" for k, v in b["us_per_message"].items())
                lines.append(f"- {path}: {parts}; total **{b['total_us']:.1f} us**; the {cores} cores' wall time "
                             f"is {b['wall_us']:.1f} us per message ({b['busy']:.0%} busy)")
    lines += ["", "## Request/reply round trip, 256 B, QoS 1", "", "| path | exchanges | p50 ms | p99 ms | lost |",
              "|---|---|---|---|---|"]
    for path, rt in r.get("rtt", {}).items():
        lines.append(f"| {path} | {_fmt(rt.get('n'))} | {_fmt(rt.get('p50_ms'))} | {_fmt(rt.get('p99_ms'))} | "
                     f"{_fmt(rt.get('lost'))} |")
    slim_rt = r.get("slim", {}).get("rtt", [])
    if slim_rt:
        s = slim_rt[0]
        lines.append(f"| SLIM (MLS, reliable) | {_fmt(s.get('n'))} | {_fmt(s.get('p50_ms'))} | "
                     f"{_fmt(s.get('p99_ms'))} | - |")
    floor = r.get("rtt_floor") or {}
    if floor:
        bx, dc = floor.get("broker_exchange") or {}, floor.get("durable_commit") or {}
        relay_rtt = (r.get("relay", {}).get("micro") or {}).get("rtt_ms_median")
        lines += ["", f"The parts alone (bench/rtt_floor.py, p50): a request/reply through one Mosquitto "
                      f"{_fmt(bx.get('p50_ms'))} ms (two broker passes), our store's durable commit "
                      f"{_fmt(dc.get('p50_ms'))} ms, the relay's round trip {_fmt(relay_rtt)} ms. "
                      f"A round trip of ours crosses four broker passes, four durable commits and one relay round "
                      f"trip: **{_fmt(floor.get('floor_p50_ms'))} ms** before any gateway work (the p50 target is "
                      f"2 ms)."]
    lines += ["", f"SLIM: {r.get('slim', {}).get('status', 'not measured')}", ""]
    relay = r.get("relay", {})
    lines += ["## Relay", ""]
    micro = relay.get("micro") or {}
    if micro:
        lines.append(f"- routed envelopes/s (bench/relay_micro.py, batched, {micro.get('envelope_bytes')} B): "
                     f"{_fmt(micro.get('batched_envelopes_per_s'))} ({_fmt(micro.get('count'))} envelopes; the relay "
                     f"used {_fmt(micro.get('relay_cpu_s_batched'))} s of CPU, "
                     f"{_fmt(micro.get('envelopes_per_relay_cpu_s'))} per CPU-second); one envelope per frame: "
                     f"{_fmt(micro.get('unbatched_envelopes_per_s'))}; relay round trip p50 "
                     f"{_fmt(micro.get('rtt_ms_median'))} ms")
    conns = relay.get("connections") or {}
    if conns:
        lines.append(f"- connections held: {_fmt(conns.get('held'))} of {_fmt(conns.get('connections_target'))} "
                     f"(failed {_fmt(conns.get('failed'))}); relay RSS {_fmt(conns.get('relay_rss_idle_kib'))} KiB "
                     f"-> {_fmt(conns.get('relay_rss_loaded_kib'))} KiB, "
                     f"{_fmt(conns.get('bytes_per_connection'))} B per connection; "
                     f"{_fmt(conns.get('connects_per_s'))} authenticated connects/s")
    for key in ("micro_error", "connections_error"):
        if relay.get(key):
            lines.append(f"- {key}: {relay[key]}")
    gw = r.get("gateway", {})
    lines += ["", "## Gateway", "",
              f"- RSS idle: {_fmt(gw.get('rss_idle_mb'))} MB; under load (peak, largest of the two gateways): "
              f"{_fmt(gw.get('rss_load_256_mb'))} MB in the 256 B run (the target's figure), "
              f"{_fmt(gw.get('rss_load_mb'))} MB over all runs; by message size: "
              f"{gw.get('rss_load_by_size_mb')} MB (per gateway, all runs: {gw.get('rss_peak_kib')} KiB)"]
    cs = gw.get("cold_start") or {}
    if cs:
        lines.append(f"- cold start to link ready: {_fmt(cs.get('cold_start_s'))} s median of {cs.get('runs')} "
                     f"({cs.get('samples_s')}); interpreter + imports alone: {_fmt(cs.get('python_imports_s'))} s")
    grp = r.get("groups") or {}
    lines += ["", "## Group fan-out (MLS group, relay as Delivery Service)", ""]
    if grp.get("deliveries_expected") is not None:
        lines.append(f"- {grp['members']} agents on {grp['gateways']} gateways, one sender, burst of "
                     f"{grp['messages']:,}: {grp['group_msg_s']:,} group messages/s (every member has every "
                     f"message), {grp['deliveries_s']:,} deliveries/s; delivered {grp['deliveries']:,} of "
                     f"{grp['deliveries_expected']:,} (missing {grp['lost']:,} when the members gave up after "
                     f"{grp.get('idle_s')} s without progress; duplicates {grp['duplicates']:,}); "
                     f"commit adding {grp['members'] - 1} members {grp['add_commit_s']} s")
    else:
        lines.append(f"- {grp.get('status', 'not measured')}")
    mls = r.get("mls", {})
    lines += ["", "## MLS (gateway/protocol/mls, suite 1)", ""]
    if mls.get("members"):
        lines.append(f"- {mls['members']} members: create {mls['create_ms']} ms; one commit adding "
                     f"{mls['members'] - 1}: {mls['add_commit_s']} s; join from Welcome {mls['join_from_welcome_ms']}"
                     f" ms; process a commit with path {mls['process_commit_ms']} ms; protect + unprotect 1 KiB "
                     f"{mls['protect_unprotect_1k_us']} us (median)")
    else:
        lines.append(f"- {mls.get('status', 'not yet')}")
    ex = r.get("experiments") or {}
    if ex:
        lines += ["", "## Experiments (same code, one setting changed)", ""]
        crash = ex.get("durability_crash") or {}
        t, rt = crash.get("tput_256") or {}, crash.get("rtt") or {}
        if t or rt:
            lines.append(f"- ours with `store.durability: crash` (no fsync per ingest batch): 256 B "
                         f"{_fmt(t.get('msg_s'))} msg/s (lost {_fmt(t.get('lost'))}); round trip p50 "
                         f"{_fmt(rt.get('p50_ms'))} ms, p99 {_fmt(rt.get('p99_ms'))} ms")
        ssl16 = ex.get("relay_ssl_buffer_17k") or {}
        if ssl16:
            lines.append(f"- relay with asyncio `SSLProtocol.max_size` = {ssl16.get('ssl_read_buffer')} B (default "
                         f"256 KiB): {_fmt(ssl16.get('held'))} connections, {_fmt(ssl16.get('bytes_per_connection'))}"
                         f" B per connection")
    lines += ["", "## Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    for c in r.get("targets", []):
        lines.append(f"| {c['name']} | {c['target']} | {c['value']} | {c['status']} |")
    prof = r.get("profile") or {}
    if prof.get("gateways"):
        lines += ["", "## Profile (cProfile, event-loop thread of each gateway, 256 B throughput run)", "",
                  "CPU time of the loop thread (`time.thread_time`), start-up included (`compile` and `exec` are "
                  "imports); waiting in epoll is not counted. Own time of `daemon.py run`, the outermost coroutine, "
                  "is C code that runs no Python frame (uvloop, libuv, the C task steps). The paho network thread "
                  "and `to_thread` workers are not in it.", ""]
        for name, p in prof["gateways"].items():
            lines += [f"### {name}: {p['cpu_s']} s of CPU on the loop thread", "",
                      "| own time s | calls | function |", "|---|---|---|"]
            lines += [f"| {e['tottime_s']} | {e['calls']:,} | `{e['where']}` |" for e in p["top_own_time"][:12]]
            lines.append("")
    if r.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"
