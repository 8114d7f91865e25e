"""Transcript hashes and the confirmation tag (RFC 9420 sections 8.2 and 6.1).

The confirmed transcript hash chains every commit (its content and signature) onto the interim hash of the
previous epoch; the interim hash then adds the commit's confirmation tag. Agreeing on both means agreeing on
the whole history of commits.
"""

from __future__ import annotations

from gateway.protocol.mls.codec import Writer
from gateway.protocol.mls.crypto import CipherSuite, ct_equal
from gateway.protocol.mls.errors import MlsVerificationError
from gateway.protocol.mls.framing import AuthenticatedContent, FramedContent
from gateway.protocol.mls.protection import encoded_content
from gateway.protocol.mls.wire import WireFormat


def confirmed_transcript_hash_input(wire_format: WireFormat, content: FramedContent, signature: bytes) -> bytes:
    w = Writer().u16(wire_format).raw(encoded_content(content))
    return w.opaque(signature).bytes()


def confirmed_transcript_hash(cs: CipherSuite, interim_before: bytes, commit: AuthenticatedContent) -> bytes:
    data = confirmed_transcript_hash_input(commit.wire_format, commit.content, commit.auth.signature)
    return cs.hash(interim_before + data)


def interim_transcript_hash(cs: CipherSuite, confirmed: bytes, confirmation_tag: bytes) -> bytes:
    return cs.hash(confirmed + Writer().opaque(confirmation_tag).bytes())


def confirmation_tag(cs: CipherSuite, confirmation_key: bytes, confirmed: bytes) -> bytes:
    return cs.mac(confirmation_key, confirmed)


def check_confirmation_tag(cs: CipherSuite, confirmation_key: bytes, confirmed: bytes, tag: bytes) -> None:
    if not ct_equal(confirmation_tag(cs, confirmation_key, confirmed), tag):
        raise MlsVerificationError("confirmation tag mismatch: the committer derived a different epoch")


def initial_interim_transcript_hash(cs: CipherSuite, confirmation_key: bytes) -> bytes:
    """For a new group (epoch 0, empty confirmed transcript hash): interim hash over the epoch-0 tag."""
    return interim_transcript_hash(cs, b"", confirmation_tag(cs, confirmation_key, b""))
