"""Message protection (RFC 9420 sections 6.1-6.3): signing and membership tags for PublicMessage, and the
two-layer encryption of PrivateMessage (content under the sender's ratchet key with a reuse guard, sender data
under a key bound to the content ciphertext), with padding.

What goes in is always checked before anything is kept: an opened PrivateMessage consumes its ratchet key only
after the AEAD and the sender's signature have both verified, so a forged message leaves the secret tree as it
was. Checks that need group state (epoch, group id, membership) belong to the group layer, which supplies the
sender's signature key through a callback that raises for senders it does not recognise.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from gateway.protocol.mls.codec import Reader, encode_varint
from gateway.protocol.mls.crypto import CipherSuite, Signer, check_signature, ct_equal, sign_with_label
from gateway.protocol.mls.errors import MlsDecodeError, MlsError, MlsVerificationError
from gateway.protocol.mls.framing import (
    FRAMED_CONTENT_SIGN_LABEL,
    AuthenticatedContent,
    FramedContent,
    FramedContentAuthData,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
    authenticated_content_tbm,
    encode_private_content,
    framed_content_tbs,
    private_content_aad,
    sender_data_aad,
)
from gateway.protocol.mls.secret_tree import RatchetType, SecretTree, sender_data_key_nonce
from gateway.protocol.mls.tree_math import LeafIndex
from gateway.protocol.mls.welcome_structs import GroupContext
from gateway.protocol.mls.wire import ContentType, ProtocolVersion, SenderType, WireFormat

SignatureKeyLookup = Callable[[Sender], bytes]
"""Returns the signature public key of a sender in the current epoch, or raises MlsError if there is none."""


def _ratchet_type(content_type: ContentType) -> RatchetType:
    return RatchetType.APPLICATION if content_type == ContentType.APPLICATION else RatchetType.HANDSHAKE


@lru_cache(maxsize=16)
def _context_bytes_by_value(context: GroupContext) -> bytes:
    return context.to_bytes()


_contexts_by_id: dict[int, tuple[GroupContext, bytes]] = {}


def _context_bytes(context: GroupContext) -> bytes:
    """The GroupContext is the same for every message of an epoch: encode it once. Looked up first by identity
    (hashing a GroupContext with its extensions costs more than encoding it); an entry holds its context, so
    its id cannot be reused while it is cached."""
    hit = _contexts_by_id.get(id(context))
    if hit is not None and hit[0] is context:
        return hit[1]
    data = _context_bytes_by_value(context)
    if len(_contexts_by_id) >= 16:
        _contexts_by_id.clear()
    _contexts_by_id[id(context)] = (context, data)
    return data


_last_encoded: tuple[FramedContent, bytes] | None = None


def encoded_content(content: FramedContent) -> bytes:
    """The encoding of a FramedContent. The same content is encoded up to three times per message (membership
    tag, signature, transcript hash) and a commit can be large, so the last one is remembered (by identity;
    the tuple is replaced whole, so concurrent callers at worst recompute)."""
    global _last_encoded
    last = _last_encoded
    if last is not None and last[0] is content:
        return last[1]
    data = content.to_bytes()
    _last_encoded = (content, data)
    return data


_SENDERS_WITH_CONTEXT = (SenderType.MEMBER, SenderType.NEW_MEMBER_COMMIT)
_TBS_HEADS = {wf: ProtocolVersion.MLS10.to_bytes(2, "big") + wf.to_bytes(2, "big") for wf in WireFormat}


def content_tbs(wire_format: WireFormat, content: FramedContent, context: GroupContext) -> bytes:
    """FramedContentTBS (the same bytes as `framing.framed_content_tbs`, with the epoch's context cached)."""
    if content.sender.sender_type not in _SENDERS_WITH_CONTEXT:
        return framed_content_tbs(wire_format, content, None)
    head = _TBS_HEADS.get(wire_format)
    if head is None:
        head = ProtocolVersion.MLS10.to_bytes(2, "big") + wire_format.to_bytes(2, "big")
    return b"".join((head, encoded_content(content), _context_bytes(context)))


def sign_content(
    signer: Signer, wire_format: WireFormat, content: FramedContent, context: GroupContext
) -> bytes:
    return sign_with_label(signer, FRAMED_CONTENT_SIGN_LABEL, content_tbs(wire_format, content, context))


def verify_content_signature(
    cs: CipherSuite, signature_key: bytes, ac: AuthenticatedContent, context: GroupContext
) -> None:
    tbs = content_tbs(ac.wire_format, ac.content, context)
    check_signature(cs, signature_key, FRAMED_CONTENT_SIGN_LABEL, tbs, ac.auth.signature)


def membership_tag(cs: CipherSuite, membership_key: bytes, ac: AuthenticatedContent, context: GroupContext) -> bytes:
    tbs = content_tbs(ac.wire_format, ac.content, context)
    return cs.mac(membership_key, authenticated_content_tbm(tbs, ac.auth))


def sign_authenticated_content(
    signer: Signer,
    wire_format: WireFormat,
    content: FramedContent,
    context: GroupContext,
    confirmation_tag: bytes | None = None,
) -> AuthenticatedContent:
    """Sign a FramedContent for the given wire format; commits need their confirmation tag."""
    if (confirmation_tag is not None) != (content.content_type == ContentType.COMMIT):
        raise MlsError("a confirmation tag must be given exactly for commits")
    signature = sign_content(signer, wire_format, content, context)
    return AuthenticatedContent(wire_format, content, FramedContentAuthData(signature, confirmation_tag))


# --- PublicMessage ----------------------------------------------------------------------------------------


def protect_public(
    cs: CipherSuite, ac: AuthenticatedContent, context: GroupContext, membership_key: bytes | None
) -> PublicMessage:
    """Wrap signed content in a PublicMessage, adding the membership tag for member senders."""
    if ac.wire_format != WireFormat.PUBLIC_MESSAGE:
        raise MlsError("content signed for another wire format cannot be sent as a PublicMessage")
    if ac.content.content_type == ContentType.APPLICATION:
        raise MlsError("application data must be sent as a PrivateMessage (RFC 9420 section 6.2)")
    tag = None
    if ac.content.sender.sender_type == SenderType.MEMBER:
        if membership_key is None:
            raise MlsError("a member's PublicMessage needs the membership key")
        tag = membership_tag(cs, membership_key, ac, context)
    return PublicMessage(ac.content, ac.auth, tag)


def unprotect_public(
    cs: CipherSuite,
    msg: PublicMessage,
    context: GroupContext,
    membership_key: bytes | None,
    signature_key_for: SignatureKeyLookup,
) -> AuthenticatedContent:
    """Verify a PublicMessage's membership tag (member senders) and signature; return its content."""
    if msg.content.content_type == ContentType.APPLICATION:
        raise MlsVerificationError("application data in a PublicMessage is not allowed")
    ac = AuthenticatedContent(WireFormat.PUBLIC_MESSAGE, msg.content, msg.auth)
    if msg.content.sender.sender_type == SenderType.MEMBER:
        if membership_key is None or msg.membership_tag is None:
            raise MlsVerificationError("a member's PublicMessage needs a membership tag")
        if not ct_equal(membership_tag(cs, membership_key, ac, context), msg.membership_tag):
            raise MlsVerificationError("membership tag mismatch: not sent by a member of this epoch")
    verify_content_signature(cs, signature_key_for(msg.content.sender), ac, context)
    return ac


# --- PrivateMessage ---------------------------------------------------------------------------------------


def _apply_reuse_guard(nonce: bytes, guard: bytes) -> bytes:
    if len(guard) != 4:
        raise ValueError("reuse_guard is exactly 4 bytes")
    return (int.from_bytes(nonce[:4], "big") ^ int.from_bytes(guard, "big")).to_bytes(4, "big") + nonce[4:]


def _padding_for(length: int, padding_block: int) -> int:
    if padding_block <= 1:
        return 0
    return (-length) % padding_block


def protect_private(
    cs: CipherSuite,
    ac: AuthenticatedContent,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    *,
    padding_block: int = 0,
    reuse_guard: bytes | None = None,
) -> PrivateMessage:
    """Encrypt signed member content with the sender's next ratchet key; that key is deleted as it is used."""
    content = ac.content
    if ac.wire_format != WireFormat.PRIVATE_MESSAGE:
        raise MlsError("content signed for another wire format cannot be sent as a PrivateMessage")
    if content.sender.sender_type != SenderType.MEMBER or content.sender.index is None:
        raise MlsError("only members send PrivateMessages")
    leaf = LeafIndex(content.sender.index)
    ctype = content.content_type
    body = encode_private_content(content.content, ac.auth)
    padding = _padding_for(len(body), padding_block)
    if padding:
        body += bytes(padding)  # PrivateMessageContent with `padding` zero bytes
    guard = os.urandom(4) if reuse_guard is None else reuse_guard
    kn = secret_tree.next_for_sending(leaf, _ratchet_type(ctype))
    aad = private_content_aad(content.group_id, content.epoch, ctype, content.authenticated_data)
    ciphertext = cs.aead_seal(kn.key, _apply_reuse_guard(kn.nonce, guard), aad, body)
    sd_key, sd_nonce = sender_data_key_nonce(cs, sender_data_secret, ciphertext)
    sender_data = SenderData(leaf, kn.generation, guard).to_bytes()
    encrypted_sender_data = cs.aead_seal(sd_key, sd_nonce, sender_data_aad(content.group_id, content.epoch, ctype),
                                         sender_data)
    return PrivateMessage(content.group_id, content.epoch, ctype, content.authenticated_data, encrypted_sender_data,
                          ciphertext)


@dataclass(frozen=True)
class OpenedPrivateMessage:
    """A decrypted PrivateMessage whose signature has verified. `consumed` says whether its ratchet key has
    already been deleted; if not, the caller calls `consume()` once it accepts the message."""

    content: AuthenticatedContent
    leaf: LeafIndex
    ratchet: RatchetType
    generation: int
    consumed: bool

    def consume(self, secret_tree: SecretTree) -> None:
        if not self.consumed:
            secret_tree.consume(self.leaf, self.ratchet, self.generation)


def _open_sender_data(
    cs: CipherSuite, sender_data_secret: bytes, aad: bytes, encrypted_sender_data: bytes, ciphertext: bytes
) -> tuple[int, int, bytes]:
    """(leaf_index, generation, reuse_guard) of a PrivateMessage, `aad` being its SenderDataAAD."""
    sd_key, sd_nonce = sender_data_key_nonce(cs, sender_data_secret, ciphertext)
    raw = cs.aead_open(sd_key, sd_nonce, aad, encrypted_sender_data)
    if len(raw) == 12:  # the fixed-size SenderData {uint32 leaf_index; uint32 generation; opaque reuse_guard[4]}
        return int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:8], "big"), raw[8:]
    r = Reader(raw)  # anything else is refused here, as before
    sd = SenderData.decode(r)
    r.expect_done()
    return sd.leaf_index, sd.generation, sd.reuse_guard


def decrypt_sender_data(cs: CipherSuite, msg: PrivateMessage, sender_data_secret: bytes) -> SenderData:
    aad = sender_data_aad(msg.group_id, msg.epoch, msg.content_type)
    return SenderData(*_open_sender_data(cs, sender_data_secret, aad, msg.encrypted_sender_data, msg.ciphertext))


def unprotect_private(
    cs: CipherSuite,
    msg: PrivateMessage,
    context: GroupContext,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    signature_key_for: SignatureKeyLookup,
    *,
    consume: bool = True,
) -> OpenedPrivateMessage:
    """Decrypt and verify a PrivateMessage. With `consume`, the ratchet key is deleted once every check here has
    passed; without, nothing changes until the caller consumes it (after its own checks)."""
    sd = decrypt_sender_data(cs, msg, sender_data_secret)
    leaf = LeafIndex(sd.leaf_index)
    if leaf >= secret_tree.n_leaves:
        raise MlsVerificationError(f"sender data names leaf {leaf}, outside the tree")
    sender = Sender.member(leaf)
    signature_key = signature_key_for(sender)  # raises for a blank or unknown leaf
    rt = _ratchet_type(msg.content_type)
    kn = secret_tree.key_for(leaf, rt, sd.generation)
    aad = private_content_aad(msg.group_id, msg.epoch, msg.content_type, msg.authenticated_data)
    plaintext = cs.aead_open(kn.key, _apply_reuse_guard(kn.nonce, sd.reuse_guard), aad, msg.ciphertext)
    try:
        inner = PrivateMessageContent.from_bytes(plaintext, msg.content_type)
    except ValueError as e:  # structural rules of the framing dataclasses
        raise MlsDecodeError(f"PrivateMessageContent: {e}") from None
    content = FramedContent(msg.group_id, msg.epoch, sender, msg.authenticated_data, inner.content)
    ac = AuthenticatedContent(WireFormat.PRIVATE_MESSAGE, content, inner.auth)
    verify_content_signature(cs, signature_key, ac, context)
    if consume:
        secret_tree.consume(leaf, rt, sd.generation)
    return OpenedPrivateMessage(ac, leaf, rt, sd.generation, consume)


# --- application messages ---------------------------------------------------------------------------------
#
# Every application message goes through these two, so they build the bytes of the generic path above directly,
# without the FramedContent, AuthenticatedContent, SenderData, KeyNonce and OpenedPrivateMessage objects the
# generic path makes and takes apart again. tests/mls/test_application_fast_path.py checks them against the
# generic path: the same messages byte for byte (Ed25519 signatures are deterministic), the same results and
# the same errors.

_PRIVATE_TBS_HEAD = _TBS_HEADS[WireFormat.PRIVATE_MESSAGE]


def seal_application(
    cs: CipherSuite,
    signer: Signer,
    context: GroupContext,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    leaf: LeafIndex,
    data: bytes,
    authenticated_data: bytes = b"",
    *,
    padding_block: int = 0,
    reuse_guard: bytes | None = None,
) -> PrivateMessage:
    """`protect_private(sign_authenticated_content(PRIVATE_MESSAGE, FramedContent(group id, epoch,
    Sender.member(leaf), authenticated_data, data), context))` for the group and epoch of `context`."""
    group_id, epoch = context.group_id, context.epoch
    gid_epoch = encode_varint(len(group_id)) + group_id + epoch.to_bytes(8, "big")
    aad_field = encode_varint(len(authenticated_data)) + authenticated_data
    data_field = encode_varint(len(data)) + data
    sender = leaf.to_bytes(4, "big")
    # FramedContentTBS: version, wire format, FramedContent (sender type member, content type application), context
    tbs = b"".join((_PRIVATE_TBS_HEAD, gid_epoch, b"\x01", sender, aad_field, b"\x01", data_field,
                    _context_bytes(context)))
    signature = sign_with_label(signer, FRAMED_CONTENT_SIGN_LABEL, tbs)
    body = b"".join((data_field, encode_varint(len(signature)), signature))  # PrivateMessageContent
    padding = _padding_for(len(body), padding_block)
    if padding:
        body += bytes(padding)
    guard = os.urandom(4) if reuse_guard is None else reuse_guard
    generation, key, nonce = secret_tree.next_key_and_nonce_for_sending(leaf, RatchetType.APPLICATION)
    sd_aad = gid_epoch + b"\x01"  # SenderDataAAD; PrivateContentAAD adds authenticated_data
    ciphertext = cs.aead_seal(key, _apply_reuse_guard(nonce, guard), sd_aad + aad_field, body)
    sd_key, sd_nonce = sender_data_key_nonce(cs, sender_data_secret, ciphertext)
    encrypted_sender_data = cs.aead_seal(sd_key, sd_nonce, sd_aad, sender + generation.to_bytes(4, "big") + guard)
    return PrivateMessage(group_id, epoch, ContentType.APPLICATION, authenticated_data, encrypted_sender_data,
                          ciphertext)


def open_application(
    cs: CipherSuite,
    msg: PrivateMessage,
    context: GroupContext,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    signature_key_of: Callable[[LeafIndex], bytes],
) -> tuple[LeafIndex, int, bytes]:
    """`unprotect_private(..., consume=False)` for a PrivateMessage of content type application: the same checks
    in the same order with the same errors, returning (sender leaf, generation, data). `signature_key_of` raises
    for a leaf that is not a member. Nothing is consumed: the caller calls `secret_tree.consume(leaf,
    RatchetType.APPLICATION, generation)` once it accepts the message."""
    if msg.content_type != ContentType.APPLICATION:
        raise MlsError("open_application takes application messages only")
    group_id, authenticated_data, ciphertext = msg.group_id, msg.authenticated_data, msg.ciphertext
    gid_epoch = encode_varint(len(group_id)) + group_id + msg.epoch.to_bytes(8, "big")
    sd_aad = gid_epoch + b"\x01"
    leaf_index, generation, guard = _open_sender_data(cs, sender_data_secret, sd_aad, msg.encrypted_sender_data,
                                                      ciphertext)
    leaf = LeafIndex(leaf_index)
    if leaf >= secret_tree.n_leaves:
        raise MlsVerificationError(f"sender data names leaf {leaf}, outside the tree")
    signature_key = signature_key_of(leaf)
    key, nonce = secret_tree.key_and_nonce_for(leaf, RatchetType.APPLICATION, generation)
    aad_field = encode_varint(len(authenticated_data)) + authenticated_data
    plaintext = cs.aead_open(key, _apply_reuse_guard(nonce, guard), sd_aad + aad_field, ciphertext)
    r = Reader(plaintext)  # PrivateMessageContent: opaque data, opaque signature, zero padding
    data = r.opaque()
    signature = r.opaque()
    padding = plaintext[r.pos:]
    if padding.count(0) != len(padding):
        raise MlsDecodeError("PrivateMessageContent padding holds non-zero bytes")
    tbs = b"".join((_PRIVATE_TBS_HEAD, gid_epoch, b"\x01", leaf_index.to_bytes(4, "big"), aad_field, b"\x01",
                    encode_varint(len(data)), data, _context_bytes(context)))
    check_signature(cs, signature_key, FRAMED_CONTENT_SIGN_LABEL, tbs, signature)
    return leaf, generation, data
