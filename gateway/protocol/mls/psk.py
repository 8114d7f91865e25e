"""Pre-shared key combination (RFC 9420 section 8.4).

Each PSK is bound to its encoded PreSharedKeyID and its position in the list, so a reordered, dropped or
substituted PSK yields a different psk_secret. The PreSharedKeyID wire struct itself lives with the proposals;
here it is taken as its encoding, which is all the derivation needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.protocol.mls.codec import Writer
from gateway.protocol.mls.crypto import CipherSuite, expand_with_label
from gateway.protocol.mls.errors import MlsError

PSK_TYPE_EXTERNAL = 1
PSK_TYPE_RESUMPTION = 2
RESUMPTION_USAGE_APPLICATION = 1
RESUMPTION_USAGE_REINIT = 2
RESUMPTION_USAGE_BRANCH = 3


@dataclass(frozen=True)
class PskInput:
    """One PSK: the encoded PreSharedKeyID and the key itself (kept out of repr)."""

    encoded_id: bytes
    psk: bytes = field(repr=False)


def encode_external_psk_id(psk_id: bytes, psk_nonce: bytes) -> bytes:
    """PreSharedKeyID for an external PSK."""
    return Writer().u8(PSK_TYPE_EXTERNAL).opaque(psk_id).opaque(psk_nonce).bytes()


def encode_resumption_psk_id(usage: int, group_id: bytes, epoch: int, psk_nonce: bytes) -> bytes:
    """PreSharedKeyID for a resumption PSK."""
    return Writer().u8(PSK_TYPE_RESUMPTION).u8(usage).opaque(group_id).u64(epoch).opaque(psk_nonce).bytes()


def psk_secret(cs: CipherSuite, psks: Sequence[PskInput]) -> bytes:
    """Combine the PSKs in order; no PSK gives the all-zero secret."""
    if len(psks) > 0xFFFF:
        raise MlsError(f"too many PSKs: {len(psks)}")
    nh = cs.hash_len
    secret = bytes(nh)
    count = len(psks)
    for index, p in enumerate(psks):
        extracted = cs.kdf_extract(bytes(nh), p.psk)
        label = Writer().raw(p.encoded_id).u16(index).u16(count).bytes()
        psk_input = expand_with_label(cs, extracted, b"derived psk", label, nh)
        secret = cs.kdf_extract(psk_input, secret)
    return secret
