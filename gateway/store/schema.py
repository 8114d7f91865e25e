"""The store's SQL schema and its version.

Plaintext columns hold only what SQL must compare: blinded row keys (HMAC, see `crypto`), times used for
ordering, expiry and pruning, and record sizes used for limits. Everything else lives in the sealed `v` column.
Tables are STRICT, so a value of the wrong type is refused on write.
Outbox usage per peer (for the limits) is counted in memory by `Outbox`: loaded with one aggregate query at open,
kept with each write (version 1 kept it in a table by triggers, three extra row writes per outbox row).
Version 3 drops the index on the outbox's peer column (see MIGRATIONS[3]). Version 4 makes `delivered` one B-tree
keyed by the blind id (WITHOUT ROWID, no index on the time; see MIGRATIONS[4]). Version 5 adds
`delivered_recent`, where new delivered ids wait (in rowid order) to be moved into `delivered` in key order
(MIGRATIONS[5], `records.DeliveredIds`). Version 6 adds `delivered_mid`, between the two: the recent ids are
folded into it (small, so cheap to fold into), and it is merged into `delivered` by key slices (MIGRATIONS[6]).
An older agw refuses a newer store
(`StoreVersionError`: "upgrade agw"); a newer one upgrades an older store when it opens it.
A new store is made with DDL_V1 and then every migration, so old and new stores take the same path.
"""

from __future__ import annotations

SCHEMA_VERSION = 6
APPLICATION_ID = 0x61677773  # "agws": marks the file as ours, checked on open.

DDL_V1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT;

CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY,
    k BLOB NOT NULL UNIQUE,
    peer BLOB NOT NULL,
    size INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    due_at_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    v BLOB NOT NULL
) STRICT;
CREATE INDEX outbox_by_due ON outbox (due_at_ms);
CREATE INDEX outbox_by_peer ON outbox (peer);
CREATE INDEX outbox_by_expiry ON outbox (expires_at_ms);

CREATE TABLE outbox_usage (peer BLOB PRIMARY KEY, n INTEGER NOT NULL, bytes INTEGER NOT NULL) STRICT;
CREATE TRIGGER outbox_usage_ins AFTER INSERT ON outbox BEGIN
    INSERT INTO outbox_usage (peer, n, bytes) VALUES (NEW.peer, 1, NEW.size)
        ON CONFLICT (peer) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER outbox_usage_del AFTER DELETE ON outbox BEGIN
    UPDATE outbox_usage SET n = n - 1, bytes = bytes - OLD.size WHERE peer = OLD.peer;
    DELETE FROM outbox_usage WHERE peer = OLD.peer AND n <= 0;
END;
CREATE TRIGGER outbox_usage_upd AFTER UPDATE OF peer, size ON outbox BEGIN
    UPDATE outbox_usage SET n = n - 1, bytes = bytes - OLD.size WHERE peer = OLD.peer;
    DELETE FROM outbox_usage WHERE peer = OLD.peer AND n <= 0;
    INSERT INTO outbox_usage (peer, n, bytes) VALUES (NEW.peer, 1, NEW.size)
        ON CONFLICT (peer) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;

CREATE TABLE delivered (k BLOB PRIMARY KEY, at_ms INTEGER NOT NULL) STRICT;
CREATE INDEX delivered_by_time ON delivered (at_ms);

CREATE TABLE sessions (k BLOB PRIMARY KEY, v BLOB NOT NULL) STRICT;
CREATE TABLE secrets (k BLOB PRIMARY KEY, v BLOB NOT NULL) STRICT;
CREATE TABLE inbox (k BLOB PRIMARY KEY, v BLOB NOT NULL) STRICT;
CREATE TABLE peers (k BLOB PRIMARY KEY, v BLOB NOT NULL) STRICT;

CREATE TABLE consent (k BLOB PRIMARY KEY, peer BLOB NOT NULL, v BLOB NOT NULL) STRICT;
CREATE INDEX consent_by_peer ON consent (peer);

CREATE TABLE audit (idx INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, v BLOB NOT NULL, mac BLOB NOT NULL) STRICT;
"""

# Version n -> SQL that upgrades a version n-1 store to n.
MIGRATIONS: dict[int, str] = {
    # 2: the outbox's usage per peer is counted in memory (gateway/store/outbox.py), not by triggers.
    2: """
DROP TRIGGER IF EXISTS outbox_usage_ins;
DROP TRIGGER IF EXISTS outbox_usage_del;
DROP TRIGGER IF EXISTS outbox_usage_upd;
DROP TABLE IF EXISTS outbox_usage;
""",
    # 3: no index on the outbox's peer column. Every outbox row is inserted and deleted once per message, and the
    # index cost ~1 us per row each way; the queries by peer are rare (an operator's purge or a peer coming back
    # online reschedules its rows, a broker redelivery recounts usage) and scan the table instead.
    3: """
DROP INDEX IF EXISTS outbox_by_peer;
""",
    # 4: the delivered ids in one B-tree keyed by the blind id. Version 1's table was three: the rowid table, the
    # unique index on `k` and the index on `at_ms`, each written per id. The keys are random, so once the table is
    # larger than a frame of ids each new id dirties a page of its own (written to the WAL at the commit), and the
    # cost per id grew with the table (30 days of ids are kept). With one B-tree the receiver's store work per
    # message at 100,000 ids is ~4 us lower (bench/receiver_store_micro.py, docs/performance.md 2026-12-07). The
    # hourly prune scans by key range instead of the time index (`DeliveredIds.prune_slice`). The same keys and
    # times are copied: an id delivered before the upgrade is still a duplicate after it.
    4: """
CREATE TABLE delivered_v4 (k BLOB PRIMARY KEY, at_ms INTEGER NOT NULL) STRICT, WITHOUT ROWID;
INSERT INTO delivered_v4 (k, at_ms) SELECT k, at_ms FROM delivered;
DROP TABLE delivered;
ALTER TABLE delivered_v4 RENAME TO delivered;
""",
    # 5: new delivered ids go first to `delivered_recent`, appended in rowid order (no index: its keys are also
    # held in memory for lookups, at most a few thousand), and are moved into `delivered` in key order every few
    # thousand ids, insert and delete in one transaction (`DeliveredIds.fold`). Inserted straight into the
    # random-keyed `delivered`, each of a frame's ids dirtied a page of its own, written to the WAL by the frame's
    # fsync'd commit (docs/performance.md, 2026-12-07). Nothing is copied: the ids of a version 4 store stay in
    # `delivered`, where lookups still find them.
    5: """
CREATE TABLE IF NOT EXISTS delivered_recent (k BLOB NOT NULL, at_ms INTEGER NOT NULL) STRICT;
""",
    # 6: `delivered_mid`, keyed by the blind id like `delivered`, between `delivered_recent` and `delivered`. The
    # fold of version 5 moved 4,096 random keys into `delivered` at once: once that holds ~100,000 ids and more,
    # they land on hundreds to thousands of its pages (3,226 page writes at 1,000,000 ids, ~70 ms with the event
    # loop stopped, and no saving left over inserting them one frame at a time). Now the recent ids are folded
    # into `delivered_mid` (at most a few ten thousand ids: a few hundred pages), and once that holds
    # `DeliveredIds.MID_MAX` ids it is moved into `delivered` a key range of `MERGE_SLICE` ids at a time, one
    # short transaction per step between frames: each page of `delivered` is written about once per round
    # instead of once per fold (docs/performance.md, 2026-12-07, branch `fold7`). Nothing is copied: the ids
    # of a version 5 store stay where they are, and lookups look in all three.
    6: """
CREATE TABLE IF NOT EXISTS delivered_mid (k BLOB PRIMARY KEY, at_ms INTEGER NOT NULL) STRICT, WITHOUT ROWID;
""",
}

EXPECTED_TABLES = frozenset(
    {"meta", "outbox", "delivered", "sessions", "secrets", "inbox", "peers", "consent", "audit"}
)
"""Tables every store has, whatever its version (checked before an upgrade)."""
TABLES_SINCE: dict[int, frozenset[str]] = {5: frozenset({"delivered_recent"}), 6: frozenset({"delivered_mid"})}
"""Tables a store of at least that version has (an upgrade makes them)."""
