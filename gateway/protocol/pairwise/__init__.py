"""Pairwise end-to-end encryption between two devices: prekey-based setup, Double Ratchet, signed messages.

Sans-I/O: bytes in, bytes out; no sockets, no clocks (times are passed in), randomness injectable.
Formats: docs/protocol.md ("Pairwise").
"""

from gateway.protocol.pairwise.batch import PairwiseBatch
from gateway.protocol.pairwise.book import NoSessionError, Received, Sent, SessionBook
from gateway.protocol.pairwise.crypto import Ed25519Signer, MessageSigner, RandomSource, VerifyCredential
from gateway.protocol.pairwise.errors import (
    CredentialError,
    PairwiseDecodeError,
    PairwiseError,
    PairwiseReplayError,
    PairwiseUsageError,
    PairwiseVerificationError,
    PrekeyError,
    SessionExhaustedError,
    TooManySkippedError,
    UnexpectedMessageError,
    UnknownSessionError,
)
from gateway.protocol.pairwise.prekeys import OneTimePrekey, PrekeyBundle, PrekeyStore, SignedPrekey
from gateway.protocol.pairwise.session import PairwiseSession, RatchetLimits, Role, SessionState
from gateway.protocol.pairwise.wire import MessageType, PairwiseMessage, PrekeySetup, RatchetHeader

__all__ = [
    "CredentialError",
    "Ed25519Signer",
    "MessageSigner",
    "MessageType",
    "NoSessionError",
    "OneTimePrekey",
    "PairwiseBatch",
    "PairwiseDecodeError",
    "PairwiseError",
    "PairwiseMessage",
    "PairwiseReplayError",
    "PairwiseSession",
    "PairwiseUsageError",
    "PairwiseVerificationError",
    "PrekeyBundle",
    "PrekeyError",
    "PrekeySetup",
    "PrekeyStore",
    "RandomSource",
    "RatchetHeader",
    "RatchetLimits",
    "Received",
    "Role",
    "Sent",
    "SessionBook",
    "SessionExhaustedError",
    "SessionState",
    "SignedPrekey",
    "TooManySkippedError",
    "UnexpectedMessageError",
    "UnknownSessionError",
    "VerifyCredential",
]
