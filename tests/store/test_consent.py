"""Consent: pending requests holding the first message, allow/deny/revoke, and the audit trail of changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.store import ConsentState, InvalidRecord, Store

from .conftest import SoftStorageKey


def test_first_contact_becomes_pending_with_held_message(store: Store) -> None:
    assert store.consent.request("agentA", "devB/bot", b"hello", 10) is ConsentState.PENDING
    assert store.consent.request("agentA", "devB/bot", b"second", 11) is ConsentState.PENDING
    entry = store.consent.get("agentA", "devB/bot")
    assert entry is not None and entry.held_message == b"hello" and entry.updated_ms == 10
    assert not store.consent.is_allowed("agentA", "devB/bot")
    assert store.consent.pending_count() == 1 and store.stats().pending_consent == 1


def test_allow_returns_held_message_until_released(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as s:
        s.consent.request("agentA", "devB/bot", b"hello", 10)
        assert s.consent.allow("agentA", "devB/bot", 20) == b"hello"
        assert s.consent.is_allowed("agentA", "devB/bot")
    with Store.open(db_path, key) as s:  # crash before delivery: still held
        assert [(e.peer, e.held_message) for e in s.consent.held()] == [("devB/bot", b"hello")]
        assert s.consent.release("agentA", "devB/bot")
        assert not s.consent.release("agentA", "devB/bot")
        assert s.consent.held() == [] and s.consent.is_allowed("agentA", "devB/bot")
        assert s.consent.request("agentA", "devB/bot", b"again", 30) is ConsentState.ALLOWED


def test_deny_drops_held_message_and_stays_denied(store: Store) -> None:
    store.consent.request("agentA", "devB/bot", b"spam", 10)
    store.consent.deny("agentA", "devB/bot", 11)
    entry = store.consent.get("agentA", "devB/bot")
    assert entry is not None and entry.state is ConsentState.DENIED and entry.held_message is None
    assert store.consent.request("agentA", "devB/bot", b"more", 12) is ConsentState.DENIED


def test_revoke_is_immediate(store: Store) -> None:
    store.consent.allow("agentA", "devB/bot", 10)
    assert store.consent.is_allowed("agentA", "devB/bot")
    assert store.consent.revoke("agentA", "devB/bot", 11) is ConsentState.ALLOWED
    assert not store.consent.is_allowed("agentA", "devB/bot")
    assert store.consent.state("agentA", "devB/bot") is ConsentState.DENIED


def test_list_filters_and_forget(store: Store) -> None:
    store.consent.allow("a1", "devB/x", 1)
    store.consent.request("a1", "devC/y", b"m", 2)
    store.consent.deny("a2", "devB/x", 3)
    assert [(e.local_agent, e.peer) for e in store.consent.entries()] == [("a1", "devB/x"), ("a1", "devC/y"),
                                                                         ("a2", "devB/x")]
    assert [e.peer for e in store.consent.entries(local_agent="a1", state=ConsentState.PENDING)] == ["devC/y"]
    assert [e.local_agent for e in store.consent.entries(peer_device="devB")] == ["a1", "a2"]
    assert store.consent.forget("a1", "devC/y", 4) and not store.consent.forget("a1", "devC/y", 5)
    assert store.consent.state("a1", "devC/y") is None


def test_every_change_is_audited(store: Store) -> None:
    store.consent.request("a1", "devB/x", b"m", 1)
    store.consent.allow("a1", "devB/x", 2, by="cli:root")
    store.consent.revoke("a1", "devB/x", 3)
    events = [(e.at_ms, e.event) for e in store.audit.entries()]
    assert events == [
        (1, {"type": "consent.requested", "agent": "a1", "peer": "devB/x", "held_bytes": 1}),
        (2, {"type": "consent.changed", "agent": "a1", "peer": "devB/x", "by": "cli:root", "from": "pending",
             "to": "allowed"}),
        (3, {"type": "consent.changed", "agent": "a1", "peer": "devB/x", "by": "operator", "from": "allowed",
             "to": "denied"}),
    ]
    assert store.verify_audit() == (True, None)


def test_peer_ids_are_validated(store: Store) -> None:
    for bad in ("devB", "/bot", "devB/", ""):
        with pytest.raises(InvalidRecord):
            store.consent.request("a1", bad, b"m", 1)
    with pytest.raises(InvalidRecord):
        store.consent.allow("", "devB/x", 1)
    with pytest.raises(InvalidRecord):
        store.consent.set("a1", "devB/x", "maybe", 1)  # type: ignore[arg-type]
    assert store.consent.entries() == []
