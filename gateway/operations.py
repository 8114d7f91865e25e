"""Operator actions on a gateway's store: consent, audit, export, purge.

The same functions serve the running daemon (through its control socket, so that decisions take effect at
once) and the CLI when no daemon runs (opening the store with the hardware storage key).
"""

from __future__ import annotations

import time
from typing import Any

from gateway.store import ConsentState, Store


def _now() -> int:
    return int(time.time() * 1000)


def consent_list(store: Store, agent: str | None = None) -> list[dict[str, Any]]:
    return [{"agent": e.local_agent, "peer": e.peer, "state": e.state.value, "updated_ms": e.updated_ms,
             "holding_message": e.held_message is not None}
            for e in store.consent.entries(agent)]


def consent_set(store: Store, agent: str, peer: str, action: str, *, by: str = "operator") -> dict[str, Any]:
    t = _now()
    if action == "allow":
        store.consent.allow(agent, peer, t, by=by)
    elif action == "deny":
        store.consent.deny(agent, peer, t, by=by)
    elif action == "revoke":
        store.consent.revoke(agent, peer, t, by=by)
    else:
        raise ValueError(f"unknown consent action {action!r}")
    state = store.consent.state(agent, peer)
    return {"agent": agent, "peer": peer, "state": state.value if state else None}


def audit_verify(store: Store) -> dict[str, Any]:
    ok, first_bad = store.verify_audit()
    return {"ok": ok, "first_bad_index": first_bad, "entries": len(store.audit.entries())}


def audit_list(store: Store) -> list[dict[str, Any]]:
    return [{"index": e.index, "at_ms": e.at_ms, "event": e.event} for e in store.audit.entries()]


def export(store: Store, peer: str | None) -> dict[str, Any]:
    return store.export(peer)


def purge(store: Store, peer: str) -> dict[str, Any]:
    return store.purge_peer(peer)  # audited by the store


def pending_count(store: Store) -> int:
    return len(store.consent.entries(None, ConsentState.PENDING))
