"""Welcome creation and opening (RFC 9420 section 12.4.3): the joiner's GroupSecrets are HPKE-encrypted to its
KeyPackage init key, and the GroupInfo is AEAD-encrypted under a key from the welcome secret.

Opening verifies what can be verified without the group's tree: decryption, the GroupInfo signature (given the
signer's key) and the confirmation tag against the epoch secrets the joiner derives. Tree checks and the
signer's identity are the group layer's job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.protocol.mls import key_schedule
from gateway.protocol.mls.codec import decode_all
from gateway.protocol.mls.crypto import (
    CipherSuite,
    Signer,
    check_signature,
    decrypt_with_label,
    encrypt_with_label,
    ref_hash,
    sign_with_label,
)
from gateway.protocol.mls.errors import MlsDecodeError, MlsError
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.key_schedule import EpochSecrets
from gateway.protocol.mls.proposals import PreSharedKeyID
from gateway.protocol.mls.psk import PskInput, psk_secret
from gateway.protocol.mls.transcript import check_confirmation_tag
from gateway.protocol.mls.welcome_structs import (
    GROUP_INFO_SIGN_LABEL,
    EncryptedGroupSecrets,
    GroupInfo,
    GroupSecrets,
    Welcome,
)
from gateway.protocol.mls.wire import HPKECiphertext

KEY_PACKAGE_REF_LABEL = b"MLS 1.0 KeyPackage Reference"
WELCOME_LABEL = b"Welcome"

PskLookup = Callable[[GroupSecrets], list[PskInput]]
"""Resolves the PSKs a Welcome names into their values; raises MlsError for a PSK it does not have."""


def key_package_ref(cs: CipherSuite, kp: KeyPackage) -> bytes:
    return ref_hash(cs, KEY_PACKAGE_REF_LABEL, kp.to_bytes())


def no_psks(secrets: GroupSecrets) -> list[PskInput]:
    """A PskLookup for a joiner that holds no PSKs: any named PSK is an error."""
    if secrets.psks:
        raise MlsError(f"the Welcome requires {len(secrets.psks)} PSK(s) that this client does not have")
    return []


def sign_group_info(signer: Signer, gi: GroupInfo) -> GroupInfo:
    sig = sign_with_label(signer, GROUP_INFO_SIGN_LABEL, gi.tbs())
    return GroupInfo(gi.group_context, gi.extensions, gi.confirmation_tag, gi.signer, sig)


def verify_group_info(cs: CipherSuite, gi: GroupInfo, signer_key: bytes) -> None:
    check_signature(cs, signer_key, GROUP_INFO_SIGN_LABEL, gi.tbs(), gi.signature)


@dataclass(frozen=True)
class NewMember:
    """Who a Welcome is for: the KeyPackage, and the path secret for the member's lowest shared ancestor."""

    key_package: KeyPackage
    path_secret: bytes | None = None


def create_welcome(
    cs: CipherSuite,
    group_info: GroupInfo,
    joiner_secret: bytes,
    psk_secret_value: bytes,
    members: Sequence[NewMember],
    psk_ids: tuple[PreSharedKeyID, ...] = (),
) -> Welcome:
    """Encrypt the (signed) GroupInfo and each new member's GroupSecrets."""
    welcome = key_schedule.welcome_secret(cs, joiner_secret, psk_secret_value)
    key, nonce = key_schedule.welcome_key_nonce(cs, welcome)
    encrypted_gi = cs.aead_seal(key, nonce, b"", group_info.to_bytes())
    out = []
    for m in members:
        secrets = GroupSecrets(joiner_secret, m.path_secret, psk_ids)
        kem_output, ct = encrypt_with_label(cs, m.key_package.init_key, WELCOME_LABEL, encrypted_gi,
                                            secrets.to_bytes())
        out.append(EncryptedGroupSecrets(key_package_ref(cs, m.key_package), HPKECiphertext(kem_output, ct)))
    return Welcome(cs.suite_id, tuple(out), encrypted_gi)


@dataclass(frozen=True)
class OpenedWelcome:
    """A decrypted Welcome: the GroupInfo (signature and confirmation tag verified if a signer key was given),
    the joiner's GroupSecrets, and the epoch's secrets."""

    group_info: GroupInfo
    group_secrets: GroupSecrets
    psk_secret: bytes = field(repr=False)
    epoch_secrets: EpochSecrets = field(repr=False)


def decrypt_group_secrets(cs: CipherSuite, welcome: Welcome, kp_ref: bytes, init_priv: bytes) -> GroupSecrets:
    if welcome.cipher_suite != cs.suite_id:
        raise MlsError(f"Welcome is for cipher suite {welcome.cipher_suite}, our KeyPackage for {cs.suite_id}")
    egs = welcome.secrets_for(kp_ref)
    if egs is None:
        raise MlsError("this Welcome holds no secrets for our KeyPackage")
    raw = decrypt_with_label(cs, init_priv, WELCOME_LABEL, welcome.encrypted_group_info,
                             egs.encrypted_group_secrets.kem_output, egs.encrypted_group_secrets.ciphertext)
    return decode_all(raw, GroupSecrets.decode)


def open_welcome(
    cs: CipherSuite,
    welcome: Welcome,
    key_package: KeyPackage,
    init_priv: bytes,
    psks: PskLookup = no_psks,
) -> OpenedWelcome:
    """Decrypt a Welcome and derive the epoch; checks the confirmation tag. The GroupInfo signature is checked by
    `verify_group_info` once the caller knows the signer's key (from the tree)."""
    secrets = decrypt_group_secrets(cs, welcome, key_package_ref(cs, key_package), init_priv)
    psk = psk_secret(cs, psks(secrets))
    welcome_secret = key_schedule.welcome_secret(cs, secrets.joiner_secret, psk)
    key, nonce = key_schedule.welcome_key_nonce(cs, welcome_secret)
    gi_raw = cs.aead_open(key, nonce, b"", welcome.encrypted_group_info)
    try:
        gi = decode_all(gi_raw, GroupInfo.decode)
    except ValueError as e:
        raise MlsDecodeError(f"GroupInfo: {e}") from None
    if gi.group_context.cipher_suite != cs.suite_id:
        raise MlsError("GroupInfo names a different cipher suite from the Welcome")
    epoch = key_schedule.from_joiner(cs, secrets.joiner_secret, psk, gi.group_context.to_bytes())
    check_confirmation_tag(cs, epoch.confirmation_key, gi.group_context.confirmed_transcript_hash,
                           gi.confirmation_tag)
    return OpenedWelcome(gi, secrets, psk, epoch)
