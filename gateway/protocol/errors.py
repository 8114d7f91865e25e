"""The root of every error a protocol parser or state machine may raise.

Parsers raise only subclasses of `ProtocolError` on bad input from outside (a peer, the relay, a file); any
other exception escaping a parser is a bug, and the fuzz tests check for it.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Input from outside was malformed, forged, replayed or otherwise unacceptable."""


class DecodeError(ProtocolError):
    """Bytes could not be decoded into the expected structure."""


class VerificationError(ProtocolError):
    """A signature, MAC, AEAD tag or certificate check failed."""


class ReplayError(ProtocolError):
    """A message (or its key) was already used."""
