"""Faults of the device itself: a full disk under the store, a corrupt or truncated agw.db, the PKCS#11 token
missing at start.

Promised: with the disk full the gateway does not acknowledge the broker (so the broker keeps every message) and
catches up once space returns, with nothing lost or doubled; a damaged store stops `agw run` with a clear error
instead of being used; a missing token stops it with a clear error and no traceback.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testbed import Gateway, Testbed
from tests.torture.conftest import LONG, record
from tests.torture.stream import Receiver, Sender, tally, wait_delivered

FULL_MESSAGES = 600 if LONG else 120
PAYLOAD_PAD = b"x" * 4000  # big enough that the outbox must grow the database and its WAL


def _mount_tmpfs(path: Path, size: str) -> str:
    """A real small filesystem when we may mount one (root); else a loop-free fallback is not possible, so say so."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    return "tmpfs" if out.returncode == 0 else f"unavailable: {out.stderr.strip()}"


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    tb = Testbed(tmp_path_factory.mktemp("store"))
    mounted: list[Path] = []
    try:
        tb.start_relay()
        c = tb.add_gateway("dev-c", agents={"carol": ["dev-d/dave"]})
        tb.add_gateway("dev-d", agents={"dave": ["dev-c/carol"]})
        state = c.root / "state"
        keep = c.root / "state.provisioned"
        if state.exists():
            state.rename(keep)
        kind = _mount_tmpfs(state, "24m")
        if kind == "tmpfs":
            mounted.append(state)
        if keep.exists():
            for f in keep.iterdir():
                shutil.copy2(f, state / f.name)
        tb.fs_kind = kind  # type: ignore[attr-defined]
        for gw in tb.gateways.values():
            gw.start()
        for gw in tb.gateways.values():
            gw.wait_ready()
        yield tb
    finally:
        tb.close()
        for m in mounted:
            subprocess.run(["umount", "-l", str(m)], check=False)


def _fill(path: Path) -> Path:
    """Fill the filesystem under `path` to the last block."""
    filler = path / "filler"
    with filler.open("wb", buffering=0) as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_full_disk_holds_messages_unacknowledged_and_recovers(bed: Testbed) -> None:
    if bed.fs_kind != "tmpfs":  # type: ignore[attr-defined]
        pytest.fail(f"cannot build a small filesystem for the store (need root for tmpfs): {bed.fs_kind}")  # type: ignore[attr-defined]
    c, d = bed.gateways["dev-c"], bed.gateways["dev-d"]
    dave_in = Receiver("dave", d.broker.port)
    dave_in.start()
    carol = Sender("carol", c.broker.port, "dev-d/dave", batch=10)
    carol.start()
    state = c.root / "state"
    filler = _fill(state)
    free_when_full = shutil.disk_usage(state).free
    prefix = b"full|"
    carol.run(prefix + PAYLOAD_PAD + b"|", FULL_MESSAGES)  # the broker PUBACKs carol: the broker has them now
    time.sleep(4)
    during = len(dave_in.payloads(prefix))
    alive_while_full = c.proc is not None and c.proc.poll() is None
    refused = "outbox refuses new messages" in c.log_text()
    filler.unlink()  # space returns
    wait_delivered(dave_in, prefix, FULL_MESSAGES, 120)
    time.sleep(1.5)
    t = tally(carol.sent, dave_in.payloads(prefix))
    record("store.full_disk", filesystem="tmpfs 24 MiB", free_bytes_when_full=free_when_full,
           delivered_while_full=during, gateway_alive_while_full=alive_while_full, refusal_logged=refused,
           **t.as_dict())
    assert alive_while_full, c.log_text()
    assert refused, "the gateway never reported that the store refused messages: the disk was not really full"
    assert during < FULL_MESSAGES
    assert (t.lost, t.duplicated, t.foreign, t.same_id_redeliveries) == (0, 0, 0, 0), t
    assert t.delivered == t.copies == FULL_MESSAGES
    c.wait_ready(30)
    dave_in.stop()
    carol.stop()
    log = (c.root / "agw.log").read_text(errors="replace")
    record("store.full_disk", tracebacks=log.count("Traceback"))
    assert "Traceback" not in log, log[-3000:]


def _run_expecting_exit(gw: Gateway, timeout: float = 45.0) -> tuple[int | None, str]:
    """Start `agw run` and give it `timeout` s to refuse; returns (exit code or None if still running, output)."""
    log = gw.root / f"run-{time.monotonic_ns()}.log"
    with log.open("wb") as f:
        proc = subprocess.Popen([*_cmd(gw)], env=gw.env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            rc = None
    return rc, log.read_text(errors="replace")


def _cmd(gw: Gateway) -> list[str]:
    import sys

    return [sys.executable, "-m", "gateway.cli", "run", "--config", str(gw.config)]


DAMAGE = {
    "truncated_half": lambda b: b[: len(b) // 2],
    "truncated_to_header": lambda b: b[:100],
    "header_overwritten": lambda b: os.urandom(100) + b[100:],
    "pages_overwritten": lambda b: b[:4096] + bytes(x ^ 0x5A for x in b[4096:12288]) + b[12288:],
    "zero_length": lambda b: b"",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_store_is_refused_with_a_clear_error(bed: Testbed, damage: str) -> None:
    d = bed.gateways["dev-d"]
    assert d.stop() == 0
    db = d.root / "state" / "agw.db"
    original = {p: p.read_bytes() for p in db.parent.glob("agw.db*")}
    try:
        db.write_bytes(DAMAGE[damage](original[db]))
        rc, out = _run_expecting_exit(d)
        record(f"store.damaged.{damage}", exit_code=rc, first_error=out.strip().splitlines()[-1:] if out else [])
        assert rc not in (None, 0), f"agw run kept going on a {damage} store:\n{out[-2000:]}"
        assert "Traceback" not in out, out[-3000:]
        assert "agw.db" in out or "store" in out.lower(), out[-2000:]
    finally:
        for p in db.parent.glob("agw.db*"):
            p.unlink()
        for p, data in original.items():
            p.write_bytes(data)
        d.start()
        d.wait_ready(60)


@pytest.mark.parametrize("how", ["conf_missing", "token_dir_empty"])
def test_token_unavailable_at_start_is_a_clear_error(bed: Testbed, tmp_path: Path, how: str) -> None:
    d = bed.gateways["dev-d"]
    assert d.stop() == 0
    if how == "conf_missing":
        conf = tmp_path / "nowhere" / "softhsm2.conf"
    else:
        (tmp_path / "tokens").mkdir()
        conf = tmp_path / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    broken = dataclasses.replace(d, env={**d.env, "SOFTHSM2_CONF": str(conf)})
    try:
        rc, out = _run_expecting_exit(broken)
        record(f"hsm.unavailable.{how}", exit_code=rc, last_line=out.strip().splitlines()[-1:] if out else [])
        assert "Traceback" not in out, out[-3000:]
        low = out.lower()
        assert any(w in low for w in ("token", "pkcs11", "pkcs#11", "softhsm")), out[-2000:]
        assert rc not in (None, 0) or out.lower().count("retry") >= 1, out[-2000:]
        assert len(out.splitlines()) < 50, "error spam"
    finally:
        d.start()
        d.wait_ready(60)


TOKEN_LOSS_MESSAGES = 400 if LONG else 60


def test_token_going_away_while_running_queues_then_recovers(bed: Testbed) -> None:
    """The PKCS#11 token of a running gateway goes away (its SoftHSM files moved, as a pulled USB token) while the
    relay link must be re-authenticated: the gateway stays up, says why it cannot reconnect, keeps taking its
    agents' messages, and once the token is back it reconnects by itself and everything arrives exactly once."""
    c, d = bed.gateways["dev-c"], bed.gateways["dev-d"]
    tokens = c.root / "softhsm" / "tokens"
    away = c.root / "softhsm" / "tokens.away"
    dave_in, carol_in = Receiver("dave", d.broker.port), Receiver("carol", c.broker.port)
    carol = Sender("carol", c.broker.port, "dev-d/dave", batch=10)
    dave = Sender("dave", d.broker.port, "dev-c/carol", batch=10)
    for x in (dave_in, carol_in, carol, dave):
        x.start()
    log_mark = len(c.log_text())
    shutil.move(tokens, away)
    try:
        bed.stop_relay(signal.SIGKILL)  # both gateways must authenticate again: dev-c needs its token for that
        bed.start_relay()
        pc, pd = b"token-loss|c>d|", b"token-loss|d>c|"
        carol.run(pc, TOKEN_LOSS_MESSAGES)  # carol's broker PUBACKs: dev-c's outbox has them
        dave.run(pd, TOKEN_LOSS_MESSAGES)  # dev-c is offline: they wait at dev-d
        time.sleep(6)
        during = (len(dave_in.payloads(pc)), len(carol_in.payloads(pd)))
        alive = c.proc is not None and c.proc.poll() is None
        status = c.status()
        link_state = status["link"]["state"]  # type: ignore[index]
        said = c.log_text()[log_mark:]
    finally:
        shutil.move(away, tokens)
    wait_delivered(dave_in, pc, TOKEN_LOSS_MESSAGES, 120)
    wait_delivered(carol_in, pd, TOKEN_LOSS_MESSAGES, 120)
    time.sleep(1.5)
    cd, dc = tally(carol.sent, dave_in.payloads(pc)), tally(dave.sent, carol_in.payloads(pd))
    record("hsm.token_lost_while_running", delivered_while_away=list(during), link_state_while_away=link_state,
           c_to_d=cd.as_dict(), d_to_c=dc.as_dict())
    for x in (dave_in, carol_in, carol, dave):
        x.stop()
    assert alive, said[-3000:]
    assert link_state != "ready", status
    assert during == (0, 0), during
    assert "TokenNotFound" in said or "HardwareError" in said, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    for t in (cd, dc):
        assert (t.lost, t.duplicated, t.foreign, t.same_id_redeliveries) == (0, 0, 0, 0), t
        assert t.delivered == t.copies == TOKEN_LOSS_MESSAGES
    c.wait_ready(30)
