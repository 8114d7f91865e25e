"""The gateway's encrypted local store (SQLite, WAL): outbox, delivered ids, sessions, secrets, peers, consent, audit.

Every value is sealed with AES-256-GCM under a data key that is on disk only wrapped by the hardware storage key;
row keys are HMAC blind indexes. See `crypto` for the key design, `db` for durability and corruption handling,
and `store.Store` for the API.
"""

from .audit import AuditCheck, AuditEntry
from .consent import ConsentEntry, ConsentState
from .errors import (
    InvalidRecord,
    OutboxFull,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreFull,
    StoreKeyMismatch,
    StoreLocked,
    StoreVersionError,
)
from .outbox import OutboxEntry, OutboxLimits
from .records import Peer
from .store import Store, StoreStats

__all__ = [
    "AuditCheck",
    "AuditEntry",
    "ConsentEntry",
    "ConsentState",
    "InvalidRecord",
    "OutboxEntry",
    "OutboxFull",
    "OutboxLimits",
    "Peer",
    "Store",
    "StoreClosed",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "StoreKeyMismatch",
    "StoreLocked",
    "StoreStats",
    "StoreVersionError",
]
