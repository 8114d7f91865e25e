"""The SDK clients of an agent that acknowledge (gateway/receipts.py, docs/protocol.md "Receipts and acks").

Each SDK client names itself (`agw:instance`, random) in its announcements and its goodbye; the gateway keeps the
agent's messages while any announced client has not said goodbye, and remembers them in its store across restarts.
Older forms keep their meaning: an announcement without an instance (an older SDK, a raw client) holds until a
goodbye without one, which forgets every client of the agent (the operator's one-byte goodbye). A store written
by an older gateway (its clients unknown) stops holding at the first goodbye, as it did."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest

from gateway.daemon import Gateway
from gateway.protocol.receipts import GOODBYE, encode_ids
from gateway.receipts import ACKING_GROUPS_KEY, ACKING_KEY, MAX_INSTANCES, UNKNOWN
from gateway.store import Store, StoreError

from .conftest import SoftStorageKey, mid

pytestmark = pytest.mark.asyncio


def _gateway(store: Store) -> Gateway:
    g = object.__new__(Gateway)
    g.cfg = SimpleNamespace(agents={"bob": [], "carol": []}, store=SimpleNamespace(held_max_per_agent=10_000),
                            mqtt=SimpleNamespace(topic_prefix="agw"))
    g.store = store
    g.groups = SimpleNamespace(acked=lambda agent, ids: ids, republish_held=lambda *a, **k: None)  # type: ignore[assignment]
    g._publishing = set()
    g._init_receipts()
    return g


def _inst() -> bytes:
    return os.urandom(16)


def _props(instance: bytes | None, *more: tuple[str, str]) -> list[tuple[str, str]]:
    return ([("agw:instance", instance.hex())] if instance is not None else []) + list(more)


def _hello(g: Gateway, instance: bytes | None, agent: str = "bob", *more: tuple[str, str]) -> None:
    g._on_ack(agent, b"", _props(instance, *more))


def _bye(g: Gateway, instance: bytes | None, agent: str = "bob") -> None:
    g._on_ack(agent, GOODBYE, _props(instance))


async def test_holding_stays_on_until_the_last_announced_client_says_goodbye(store: Store) -> None:
    g = _gateway(store)
    x, y = _inst(), _inst()
    _hello(g, x)
    _hello(g, y, "bob", ("agw:groups", "g1"))
    _hello(g, x)  # (a reconnect of x, which reads no group: y's groups stay kept; before, it replaced them)
    assert g.receipts_status()["acking_clients"] == {"bob": 2} and g._acking_groups["bob"] == {"g1"}
    _hello(g, x, "bob", ("agw:groups", "g2,g1"))
    assert g._acking_groups["bob"] == {"g1", "g2"}
    assert store.secrets.get(ACKING_GROUPS_KEY + "bob") == b"g1,g2"
    _bye(g, x)
    assert "bob" in g._acking and g._acking_groups["bob"] == {"g1"}  # y is still there (before: stopped for both)
    assert store.secrets.get(ACKING_GROUPS_KEY + "bob") == b"g1"
    assert store.secrets.get(ACKING_KEY + "bob") == b"\x02" + y
    _bye(g, x)  # (again: nothing changes)
    _bye(g, _inst())  # (a client never announced: nothing changes)
    assert g.receipts_status()["acking_clients"] == {"bob": 1}
    _bye(g, y)
    assert "bob" not in g._acking and "bob" not in g._acking_groups
    assert store.secrets.get(ACKING_KEY + "bob") is None and store.secrets.get(ACKING_GROUPS_KEY + "bob") is None


async def test_the_announced_clients_are_kept_across_a_restart(db_path, key: SoftStorageKey) -> None:  # type: ignore[no-untyped-def]
    x, y = _inst(), _inst()
    with Store.open(db_path, key) as s:
        g = _gateway(s)
        _hello(g, x)
        _hello(g, y, "bob", ("agw:groups", "g1"))
    with Store.open(db_path, key) as s:
        g = _gateway(s)
        assert list(g._instances["bob"]) == [x, y] and "bob" in g._acking and g._acking_groups["bob"] == {"g1"}
        _bye(g, y)
        assert "bob" in g._acking and g._acking_groups["bob"] == {"g1"}  # (x is taken to read g1 too: kept)
    with Store.open(db_path, key) as s:
        g = _gateway(s)
        assert list(g._instances["bob"]) == [x]
        _bye(g, x)
        assert "bob" not in g._acking


async def test_older_forms_keep_their_meaning(store: Store) -> None:
    """An announcement without an instance (an older SDK): held until a goodbye without one, whatever the other
    clients do; a goodbye without one (the older SDK closing, or the operator's one-byte goodbye) forgets them all."""
    g = _gateway(store)
    x = _inst()
    _hello(g, None)
    _hello(g, x)
    _bye(g, x)
    assert "bob" in g._acking  # the older client is not known to have gone
    _hello(g, x)
    _bye(g, None)
    assert "bob" not in g._acking and "bob" not in g._instances


async def test_a_store_of_an_older_gateway_stops_holding_at_the_first_goodbye(store: Store) -> None:
    """0x01 (written before instances): the clients are unknown, so the first goodbye of any client stops holding,
    as it did; a client announced since is kept apart."""
    with store.transaction(durable=False):
        store.secrets.put(ACKING_KEY + "bob", b"\x01")
        store.secrets.put(ACKING_KEY + "carol", b"\x01")
    g = _gateway(store)
    assert {a: list(i) for a, i in g._instances.items()} == {"bob": [UNKNOWN], "carol": [UNKNOWN]}
    _bye(g, _inst())
    assert "bob" not in g._acking
    y = _inst()
    _hello(g, y, "carol")
    _bye(g, _inst(), "carol")
    assert list(g._instances["carol"]) == [y]  # the unknown ones went with the first goodbye; y stays


async def test_acks_without_an_announcement_turn_holding_on_until_any_goodbye(store: Store) -> None:
    g = _gateway(store)
    g._on_ack("bob", encode_ids([mid(1)]))
    assert list(g._instances["bob"]) == [UNKNOWN]
    _bye(g, _inst())
    assert "bob" not in g._acking


async def test_announced_clients_are_capped_per_agent(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A local agent announcing fresh instances in a loop: MAX_INSTANCES remembered (the longest-announced is
    forgotten), one warning a minute, one small record."""
    g = _gateway(store)
    clients = [_inst() for _ in range(MAX_INSTANCES + 5)]
    with caplog.at_level(logging.WARNING):
        for c in clients:
            _hello(g, c)
    assert list(g._instances["bob"]) == clients[5:]
    assert g.receipt_counters["clients_forgotten_over_cap"] == 5
    assert caplog.text.count("announced more than") == 1
    assert len(store.secrets.get(ACKING_KEY + "bob") or b"") == 1 + 16 * MAX_INSTANCES
    _bye(g, clients[0])  # forgotten: nothing changes
    assert len(g._instances["bob"]) == MAX_INSTANCES


async def test_a_malformed_instance_never_turns_holding_off(store: Store) -> None:
    g = _gateway(store)
    x = _inst()
    _hello(g, x)
    for bad in ("XYZ", x.hex().upper(), "00" * 16, "ff" * 16):
        g._on_ack("bob", GOODBYE, [("agw:instance", bad)])
        assert "bob" in g._acking, bad
    g._on_ack("carol", b"", [("agw:instance", "nope")])  # an announcement: taken as one without an instance
    assert list(g._instances["carol"]) == [bytes(16)]
    assert g.receipt_counters["bad_input"] == 5


async def test_a_store_error_leaves_the_clients_as_they_were(store: Store) -> None:
    g = _gateway(store)
    x, y = _inst(), _inst()
    _hello(g, x)
    _hello(g, y)

    def fail(*a: object, **k: object) -> None:
        raise StoreError("test: cannot write")

    store.secrets.put, real = fail, store.secrets.put  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        _bye(g, x)
    store.secrets.put = real  # type: ignore[method-assign]
    assert list(g._instances["bob"]) == [x, y]


