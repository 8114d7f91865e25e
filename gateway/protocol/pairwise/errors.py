"""Pairwise-channel errors.

Everything that bad input from outside (a peer, the relay directory, a stored blob) can cause is a
`PairwiseError`, itself a `ProtocolError`; the fuzz tests check that nothing else escapes a decoder or
`decrypt`. Misuse by the local caller (wrong signer, exhausted session) is a `PairwiseUsageError`, which is
not a `ProtocolError`: it is a bug or a lifecycle event on our side, never the peer's doing.
"""

from __future__ import annotations

from gateway.protocol.errors import DecodeError, ProtocolError, ReplayError, VerificationError


class PairwiseError(ProtocolError):
    """Root of errors caused by pairwise input from outside."""


class PairwiseDecodeError(PairwiseError, DecodeError):
    """Bytes are not a valid encoding of a pairwise message, prekey bundle, prekey store or session state."""


class PairwiseVerificationError(PairwiseError, VerificationError):
    """A signature, credential or AEAD tag did not verify, or a key was unacceptable (low-order X25519 point)."""


class CredentialError(PairwiseVerificationError):
    """The caller's `verify_credential` callback rejected the peer's credential."""


class PairwiseReplayError(PairwiseError, ReplayError):
    """The message key for this message was already consumed (a replay) or evicted from the skipped-key window."""


class TooManySkippedError(PairwiseError):
    """A message would need more skipped message keys than the session allows; the session is unchanged."""


class PrekeyError(PairwiseError):
    """A session-setup message names a prekey we do not hold (never existed, rotated out or already consumed)."""


class UnexpectedMessageError(PairwiseError):
    """A well-formed message does not belong here (other recipient, other session, setup fields that differ)."""


class UnknownSessionError(UnexpectedMessageError):
    """A RATCHET message names a session we do not hold (state lost or pruned): open a fresh session to the peer."""


class PairwiseUsageError(Exception):
    """The local caller used the API wrongly (e.g. a signer whose key is not the session's). Not peer input."""


class SessionExhaustedError(PairwiseUsageError):
    """A sending chain reached its counter limit; start a new session."""
