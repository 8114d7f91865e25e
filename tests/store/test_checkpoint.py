"""The WAL is copied into the main file by the store's background thread, not inside our commits
(gateway/store/db.py, `_Checkpointer`): SQLite's auto-checkpoint runs in whichever commit takes the WAL past 1,000
pages, i.e. on the event loop before an acknowledgement.

Observed through the wal-index header (https://www.sqlite.org/walformat.html, native byte order): mxFrame, the
frames in the WAL (u32 at byte 16), and nBackfill, those copied into the main file (u32 at byte 96).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from gateway.store import Store

from .conftest import SoftStorageKey


def _wal_index(db_path: Path) -> tuple[int, int]:
    raw = Path(f"{db_path}-shm").read_bytes()[:100]
    return int.from_bytes(raw[16:20], sys.byteorder), int.from_bytes(raw[96:100], sys.byteorder)


def _put(store: Store, size: int = 256) -> None:
    with store.transaction(durable=True):
        store.outbox.put_many([(os.urandom(16), "peer", os.urandom(size), 10**13)])


def test_commits_are_copied_into_the_main_file_soon_after_by_the_background_thread(
        db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as store:
        for _ in range(20):
            _put(store)
        frames, copied = _wal_index(db_path)
        assert 0 < frames < 1000  # far below the auto-checkpoint
        deadline = time.monotonic() + 10
        while copied < frames and time.monotonic() < deadline:
            time.sleep(0.02)
            frames, copied = _wal_index(db_path)
        assert copied == frames  # (without the thread: 0 until a commit reaches 1,000 frames)
        _put(store)
        assert _wal_index(db_path)[0] < frames  # the next commit started the WAL over


def test_a_steady_stream_of_commits_never_grows_the_wal_to_the_auto_checkpoint(
        db_path: Path, key: SoftStorageKey) -> None:
    most = 0
    with Store.open(db_path, key) as store:
        for _ in range(500):  # ~4 pages each (record, index, table): 2,000 frames without a checkpoint
            _put(store, 5000)
            most = max(most, _wal_index(db_path)[0])
            time.sleep(0.006)
        checkpoints = store._db.background_checkpoints
    assert most < 1000  # (without the thread, the commit past 1,000 frames checkpoints, on the caller's thread)
    assert checkpoints > 0


def test_close_stops_the_thread_and_removes_the_wal(db_path: Path, key: SoftStorageKey) -> None:
    with Store.open(db_path, key) as store:
        _put(store)
        assert any(t.name == "agw-store-checkpoint" for t in threading.enumerate())
    assert not any(t.name == "agw-store-checkpoint" for t in threading.enumerate())
    assert not Path(f"{db_path}-wal").exists()  # the main connection closed last: it checkpointed and removed it
    with Store.open(db_path, key) as store:  # and the store opens again with what was written
        assert store.outbox.depth() == 1
