"""Errors of the encrypted local store.

One root, `StoreError`. Each message says what happened and what the operator or caller should do. No message
contains key bytes, record contents or plaintext identifiers.

    StoreError
    +-- StoreCorrupt        the file or a record failed a check: never silently used
    +-- StoreFull           the disk (or the configured size cap) is full; the write was rolled back
    |   +-- OutboxFull      an outbox limit was hit; the batch was not stored
    +-- StoreLocked         another process has the store open
    +-- StoreKeyMismatch    the storage key cannot unwrap this store's data key
    +-- StoreVersionError   the file was written by a newer schema
    +-- StoreClosed         the store was used after close()
    +-- InvalidRecord       the caller passed a value the store cannot accept (also a ValueError)
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error raised by `gateway.store`."""


class StoreCorrupt(StoreError):
    """The database file, its metadata or a record failed an integrity or authentication check.

    Raised instead of using data that may have been truncated, damaged or tampered with. The caller should stop
    and an operator should restore the store from a backup (or move it aside and start empty).
    """


class StoreFull(StoreError):
    """The disk, or the configured size cap, is full. The transaction was rolled back and nothing was lost.

    The caller must not acknowledge whatever it tried to store (the broker will redeliver it) and should retry once
    space has been freed (deliveries drain the outbox; retention pruning frees old entries).
    """


class OutboxFull(StoreFull):
    """An outbox size limit (entries or bytes, per peer or in total) would be exceeded; nothing of the batch was stored.

    The caller must not acknowledge the broker; the agent's MQTT client will retry. `limit` names the limit hit.
    """

    def __init__(self, message: str, *, limit: str, peer_device: str | None = None) -> None:
        self.limit = limit
        self.peer_device = peer_device
        super().__init__(message)


class StoreLocked(StoreError):
    """Another process (another `agw run`?) holds the store's lock file. Stop it, or use a different store path."""


class StoreKeyMismatch(StoreError):
    """The storage key could not unwrap this store's data-encryption key: a different token, key or PCR state.

    Check the configured storage key URI against the one recorded in the store (`Store.key_uri_on_disk`).
    """


class StoreVersionError(StoreError):
    """The store's schema version is newer than this program understands. Upgrade agw; do not downgrade a store."""


class StoreClosed(StoreError):
    """The store was used after `close()`; this is a bug in the caller."""


class InvalidRecord(StoreError, ValueError):
    """A value passed by the caller is unacceptable (wrong id length, non-JSON audit event, unknown state)."""
