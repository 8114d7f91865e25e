"""The SQLite file: opening it safely, one connection behind one lock, transactions and error translation.

Why it is built this way:
- One connection, one re-entrant lock: the store is called from the daemon's event loop and worker threads;
  serialising is simpler and faster than a pool on a Pi, and SQLite serialises writers anyway.
- WAL + `synchronous=FULL`: a commit is on disk (fsynced) before we return, so the caller may then acknowledge
  the broker. `secure_delete` overwrites deleted rows in the main file.
- A new store is built in a temporary file and renamed into place, so a file at the store path is always a
  complete store: an empty, truncated or foreign file is `StoreCorrupt`, never a silently re-created store.
- A lock file (`flock`) keeps a second process from opening the same store; it is released if we are killed.
- `PRAGMA quick_check`, the application id and the schema version are checked on every open.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from .errors import StoreClosed, StoreCorrupt, StoreError, StoreFull, StoreLocked, StoreVersionError
from .schema import APPLICATION_ID, DDL_V1, EXPECTED_TABLES, MIGRATIONS, SCHEMA_VERSION, TABLES_SINCE

T = TypeVar("T")

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_NO_PAGE_LIMIT = 4294967294
_WAL_LIMIT = 4 * 1024 * 1024  # the WAL is cut back to this after a checkpoint resets it
_CACHE_KIB = 512  # page cache per connection (SQLite default 2,000 KiB): the hot pages are the outbox and inbox heads


def translate(exc: sqlite3.Error, action: str) -> StoreError:
    """Map a sqlite3 error to our error types by its (primary) result code."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == _SQLITE_FULL:
        return StoreFull(
            f"{action}: the disk or the store's size cap is full; nothing was written. "
            "Free space (or raise the cap) and retry; do not acknowledge what was not stored"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorrupt(f"{action}: the database file is damaged or not a store ({exc}); restore a backup")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreLocked(f"{action}: the database is locked by another connection ({exc}); stop the other user")
    name = getattr(exc, "sqlite_errorname", "")
    return StoreError(f"{action}: SQLite error {name} ({exc}); check the disk and the file permissions")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    # A tampered file may hold non-UTF-8 TEXT where a BLOB belongs: decode leniently, and let the type checks of
    # the readers (which expect bytes) report it as corruption instead of a decode error.
    conn.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    try:
        pragmas = ("trusted_schema=OFF", "cell_size_check=ON", "secure_delete=ON", "foreign_keys=ON",
                   f"journal_size_limit={_WAL_LIMIT}", f"cache_size=-{_CACHE_KIB}")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Database:
    """The store file: one connection, one lock, explicit transactions."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd = lock_fd
        self.lock = threading.RLock()
        self._depth = 0
        self._durable = True
        self._undo: list[Callable[[], None]] = []  # run if the current transaction rolls back (see on_rollback)

    # -- opening -------------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls, path: Path, initialise: Callable[[sqlite3.Connection], None], *, create: bool = True,
        on_upgrade: Callable[[int, int], None] | None = None,
    ) -> tuple[Database, bool]:
        """Open the store at `path` (creating it if absent and `create`); returns it and whether it was created.

        `initialise` runs once, inside the creating transaction of a new store (it writes the wrapped key).
        `on_upgrade(from, to)` is called before an older store's schema is upgraded (one transaction that can take
        a while with millions of delivered ids: the daemon tells systemd to wait longer).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreLocked(f"store {path} is open in another process (lock {path}.lock); stop it") from None
            created = False
            if not path.exists():
                if Path(f"{path}-wal").exists():
                    raise StoreCorrupt(
                        f"store {path} is missing but its write-ahead log {path}-wal exists: restore the store "
                        "file, or move the -wal/-shm files aside to start empty"
                    )
                if not create:
                    raise StoreCorrupt(f"store {path} does not exist (and creating it was not requested)")
                cls._create(path, initialise)
                created = True
            elif path.stat().st_size == 0:
                raise StoreCorrupt(f"store {path} is an empty file (truncated?); restore a backup or move it aside")
            try:
                conn = _connect(path)
            except sqlite3.Error as exc:
                raise translate(exc, f"opening store {path}") from exc
            try:
                cls._check(conn, path, on_upgrade)
            except BaseException:
                conn.close()
                raise
            return cls(path, conn, lock_fd), created
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def _create(path: Path, initialise: Callable[[sqlite3.Connection], None]) -> None:
        tmp = path.with_name(path.name + ".init")
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)  # a crash during an earlier creation; we hold the lock
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            conn = _connect(tmp)
            try:
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                    raise StoreError(f"cannot put {tmp} in WAL mode; is the file system local and writable?")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _statements(DDL_V1):  # not executescript(): it would COMMIT our transaction
                    conn.execute(stmt)
                for v in range(2, SCHEMA_VERSION + 1):  # (a new store takes the same path as an upgraded one)
                    for stmt in _statements(MIGRATIONS[v]):
                        conn.execute(stmt)
                initialise(conn)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            finally:
                conn.close()  # checkpoints and removes the -wal file
            if Path(f"{tmp}-wal").exists():  # the final checkpoint failed (disk full?): the file is incomplete
                raise StoreFull(f"could not finish creating store {path} (checkpoint failed); free space and retry")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except sqlite3.Error as exc:
            tmp.unlink(missing_ok=True)
            raise translate(exc, f"creating store {path}") from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _check(conn: sqlite3.Connection, path: Path, on_upgrade: Callable[[int, int], None] | None = None) -> None:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if app_id != APPLICATION_ID:
                raise StoreCorrupt(f"{path} is not an agw store (application id {app_id:#x}); check the path")
            rows = conn.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in rows] != ["ok"]:
                detail = "; ".join(str(r[0]) for r in rows[:3])
                raise StoreCorrupt(f"store {path} failed quick_check ({detail}); restore a backup or move it aside")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"store {path} has schema version {version}; this agw knows up to {SCHEMA_VERSION}: upgrade agw"
                )
            if version < 1:
                raise StoreCorrupt(f"store {path} has no schema version; it was never completely created")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
            expected = EXPECTED_TABLES.union(*(t for v, t in TABLES_SINCE.items() if v <= version))
            if not expected <= tables:
                missing = ", ".join(sorted(expected - tables))
                raise StoreCorrupt(f"store {path} lacks tables ({missing}); restore a backup")
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise StoreError(f"cannot put {path} in WAL mode; is the file system local and writable?")
            conn.execute("PRAGMA synchronous=FULL")
            if version < SCHEMA_VERSION:
                if on_upgrade is not None:
                    on_upgrade(version, SCHEMA_VERSION)
                conn.execute("BEGIN IMMEDIATE")
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in _statements(MIGRATIONS[v]):
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise translate(exc, f"opening store {path}") from exc

    # -- use -----------------------------------------------------------------------------------------------------
    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosed("the store is closed; open it again")
        return self._conn

    @contextlib.contextmanager
    def read(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock for a read; translates sqlite3 errors."""
        with self.lock:
            conn = self._live()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise translate(exc, action) from exc

    @contextlib.contextmanager
    def write(self, action: str, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE ... COMMIT); nested use joins the outer transaction.

        `durable` (the outermost transaction decides): fsync before returning (synchronous=FULL), so the caller
        may acknowledge what it wrote; otherwise synchronous=NORMAL, which survives a crash of the process (the
        WAL is in the OS's hands) but not a power loss. Any exception rolls the whole transaction back.
        """
        with self.lock:
            conn = self._live()
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                except sqlite3.Error as exc:
                    raise translate(exc, action) from exc
                finally:
                    self._depth -= 1
                return
            self._depth = 1
            try:
                if durable != self._durable:
                    conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
                    self._durable = durable
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                self._rollback(conn)
                undo, self._undo = self._undo, []
                for fn in reversed(undo):
                    fn()
                if isinstance(exc, sqlite3.Error):
                    raise translate(exc, action) from exc
                raise
            finally:
                self._depth = 0
                self._undo.clear()

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Call `fn` if the current write transaction rolls back: state kept in memory beside the file (the
        outbox's usage counts) follows the file. Only inside `write`."""
        if not self._depth:
            raise StoreError("on_rollback outside a write transaction")
        self._undo.append(fn)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def set_max_bytes(self, max_bytes: int | None) -> int:
        """Cap the database size (pages in file and WAL); None removes the cap. Returns the cap in effect, bytes.

        A write past the cap fails with `StoreFull` exactly like a full disk, which keeps room for logs.
        """
        with self.read("setting the size cap") as conn:
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages = _NO_PAGE_LIMIT if max_bytes is None else max(1, max_bytes // page)
            got = int(conn.execute(f"PRAGMA max_page_count={pages}").fetchone()[0])
            return got * page

    def size_bytes(self) -> int:
        with self.read("measuring the store") as conn:
            return int(conn.execute("PRAGMA page_count").fetchone()[0]) * int(
                conn.execute("PRAGMA page_size").fetchone()[0]
            )

    def checkpoint(self) -> None:
        """Copy the WAL into the main file and truncate it, so overwritten or deleted records leave the WAL too."""
        with self.read("checkpointing the store") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self.lock:
            if self._conn is None:
                return
            try:
                self._conn.close()
            finally:
                self._conn = None
                os.close(self._lock_fd)


IN_CHUNK = 512  # values per SQL `IN (...)` list at most (see `in_lists`)


@functools.cache
def _placeholders(n: int) -> str:
    return ",".join("?" * n)


def in_lists(values: Sequence[T]) -> Iterator[tuple[str, list[T]]]:
    """`values` in chunks of IN_CHUNK for SQL `IN (...)` lists: (placeholders, the chunk's values), each chunk
    padded to a power of two by repeating its last value. So a statement's text takes one of ten forms whatever
    the count, and comes prepared from the connection's statement cache: preparing a long IN list costs ~1.5 us
    per value (a delete of 256 ids: ~585 us prepared afresh, ~160 us cached). A repeated value does not change
    which rows IN matches, so each row is still selected, updated or deleted once."""
    for i in range(0, len(values), IN_CHUNK):
        chunk = list(values[i:i + IN_CHUNK])
        pad = (1 << (len(chunk) - 1).bit_length()) - len(chunk)
        if pad:
            chunk += [chunk[-1]] * pad
        yield _placeholders(len(chunk)), chunk


def keys_present(conn: sqlite3.Connection, table: str, keyed: dict[bytes, bytes]) -> set[bytes]:
    """The values of `keyed` (blind key -> id) whose key is a row of `table`: one query per 512 keys."""
    found: set[bytes] = set()
    for marks, chunk in in_lists(list(keyed)):
        sql = f"SELECT k FROM {table} WHERE k IN ({marks})"  # noqa: S608
        found.update(keyed[row[0]] for row in conn.execute(sql, chunk))
    return found


def _statements(script: str) -> list[str]:
    """Split DDL into statements (triggers contain `;` inside BEGIN ... END) using SQLite's own completeness test."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError("incomplete SQL statement in schema")
    return out
