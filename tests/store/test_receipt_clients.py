"""The SDK clients of an agent that acknowledge (gateway/receipts.py, docs/protocol.md "Receipts and acks").

Each SDK client names itself (`agw:instance`, random) in its announcements and its goodbye; the gateway keeps the
agent's messages while any announced client has not said goodbye, and remembers them in its store across restarts.
Older forms keep their meaning: an announcement without an instance (an older SDK, a raw client) holds until a
goodbye without one, which forgets every client of the agent (the operator's one-byte goodbye). A store written
by an older gateway (its clients unknown) stops holding at the first goodbye, as it did."""

from __future__ import annotations

import asyncio
import logging
import os
from types import SimpleNamespace

import pytest

from gateway import receipts
from gateway.daemon import Gateway
from gateway.protocol.receipts import GOODBYE, encode_ids
from gateway.receipts import ACKING_GROUPS_KEY, ACKING_KEY, ANONYMOUS, MAX_ANNOUNCED_GROUPS, MAX_INSTANCES, UNKNOWN
from gateway.store import Store, StoreError

from .conftest import SoftStorageKey, mid

pytestmark = pytest.mark.asyncio


def _gateway(store: Store) -> Gateway:
    g = object.__new__(Gateway)
    g.cfg = SimpleNamespace(agents={"bob": [], "carol": []}, store=SimpleNamespace(held_max_per_agent=10_000),
                            mqtt=SimpleNamespace(topic_prefix="agw"))
    g.store = store
    g.groups = SimpleNamespace(acked=lambda agent, ids: ids, republish_held=lambda *a, **k: None)  # type: ignore[assignment]
    g._publishing, g._finished = set(), []  # (no completed exchange waits for its commit: gateway/receiving.py)
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
    """A local agent announcing fresh instances in a loop: MAX_INSTANCES told apart (the least recently announced
    are merged into the anonymous client), one warning a minute, one small record."""
    g = _gateway(store)
    clients = [_inst() for _ in range(MAX_INSTANCES + 5)]
    with caplog.at_level(logging.WARNING):
        for c in clients:
            _hello(g, c)
    assert list(g._instances["bob"]) == [ANONYMOUS, *clients[6:]]
    assert g.receipt_counters["clients_forgotten_over_cap"] == 6
    assert caplog.text.count("announced more than") == 1
    assert store.secrets.get(ACKING_KEY + "bob") == b"\x02" + ANONYMOUS + b"".join(clients[6:])
    _bye(g, clients[0])  # merged: its goodbye cannot be told from a stranger's, nothing changes
    assert len(g._instances["bob"]) == MAX_INSTANCES and "bob" in g._acking
    for c in clients[6:]:
        _bye(g, c)
    assert "bob" in g._acking  # the merged clients are not known to have gone
    _bye(g, None)  # the goodbye without an instance (the operator's) ends them
    assert "bob" not in g._acking


async def test_a_running_client_pushed_over_the_cap_keeps_its_groups_held(db_path, key: SoftStorageKey) -> None:  # type: ignore[no-untyped-def]
    """A long-lived client reading g1 beside a sibling that crashes in a loop (a new instance per restart, never a
    goodbye): past the cap it is merged into the anonymous client, so g1's messages stay held for it (before, it
    was forgotten with its groups and g1's messages went at PUBCOMP while it ran), across a restart too."""
    live = _inst()
    with Store.open(db_path, key) as s:
        g = _gateway(s)
        _hello(g, live, "bob", ("agw:groups", "g1"))
        for _ in range(MAX_INSTANCES + 3):
            _hello(g, _inst())
        assert live not in g._instances["bob"] and g._acking_groups["bob"] == {"g1"}
        assert g._instances["bob"][ANONYMOUS] == {"g1"}
    with Store.open(db_path, key) as s:
        g = _gateway(s)
        assert "bob" in g._acking and g._acking_groups["bob"] == {"g1"}


async def test_the_agents_groups_together_are_capped(store: Store) -> None:
    """The bound of one client's group list (MAX_ANNOUNCED_GROUPS) holds for all of an agent's clients together:
    a local agent cycling instances with 1,000 groups each cannot make a record (and a loop pass) 16 times larger.
    The latest client's groups come first."""
    g = _gateway(store)
    for n in range(MAX_INSTANCES + 1):
        names = [f"c{n:02d}-{k:04d}" for k in range(MAX_ANNOUNCED_GROUPS)]
        _hello(g, _inst(), "carol", ("agw:groups", ",".join(names)))
    assert len(g._acking_groups["carol"]) == MAX_ANNOUNCED_GROUPS
    assert g._acking_groups["carol"] == set(names)  # (the latest)
    record = store.secrets.get(ACKING_GROUPS_KEY + "carol") or b""
    assert len(record.split(b",")) == MAX_ANNOUNCED_GROUPS


async def test_held_entries_are_not_published_again_after_the_last_goodbye(store: Store,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """What an agent still held when its last client said goodbye waits for a client that announces itself again
    (docs/operations.md): neither the announcement's pending republish nor a broker reconnect publishes it before
    (it would be deleted at PUBCOMP while no client may be there to take it, and the session of a client that
    closed is gone)."""
    monkeypatch.setattr(receipts, "HELLO_GRACE", 0.05)
    g = _gateway(store)
    g.bridge = SimpleNamespace(connected=True)  # type: ignore[assignment]
    published: list[set[str]] = []
    g._republish_names = lambda names, why: published.append(set(names)) if names else None  # type: ignore[method-assign]
    x = _inst()
    _hello(g, x)  # its republish is scheduled HELLO_GRACE later
    g._held["bob"][mid(1)] = ("inbox/entry-1", 2**62, 0, float("-inf"))  # handed, not yet acked
    _bye(g, x)
    await asyncio.sleep(0.2)
    g._republish_held(before_connect=99)  # (a reconnect's)
    assert published == []
    _hello(g, _inst())  # a client of bob announces itself: published again after the grace
    await asyncio.sleep(0.2)
    assert published == [{"inbox/entry-1"}]


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


