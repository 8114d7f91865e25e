"""The epoch key schedule (RFC 9420 section 8): from the previous init_secret, the commit secret, the PSK
secret and the new GroupContext to every secret of the epoch.

The GroupContext enters as its encoding so that this module depends on no wire struct. All secrets are kept
out of repr; `EpochSecrets` holds the epoch's outputs and is replaced, never mutated, at each epoch change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.protocol.mls.crypto import CipherSuite, derive_secret, expand_with_label

EXTERNAL_INIT_LABEL = b"MLS 1.0 external init secret"


def joiner_secret(cs: CipherSuite, init_secret: bytes, commit_secret: bytes, group_context: bytes) -> bytes:
    prk = cs.kdf_extract(init_secret, commit_secret)
    return expand_with_label(cs, prk, b"joiner", group_context, cs.hash_len)


def welcome_secret(cs: CipherSuite, joiner: bytes, psk_secret: bytes) -> bytes:
    return derive_secret(cs, cs.kdf_extract(joiner, psk_secret), b"welcome")


def welcome_key_nonce(cs: CipherSuite, welcome: bytes) -> tuple[bytes, bytes]:
    """AEAD key and nonce that protect the GroupInfo in a Welcome."""
    return (
        expand_with_label(cs, welcome, b"key", b"", cs.aead_key_len),
        expand_with_label(cs, welcome, b"nonce", b"", cs.aead_nonce_len),
    )


@dataclass(frozen=True)
class EpochSecrets:
    """The secrets of one epoch, all derived from epoch_secret (never shown in repr)."""

    joiner_secret: bytes = field(repr=False)
    welcome_secret: bytes = field(repr=False)
    sender_data_secret: bytes = field(repr=False)
    encryption_secret: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    epoch_authenticator: bytes = field(repr=False)
    external_secret: bytes = field(repr=False)
    confirmation_key: bytes = field(repr=False)
    membership_key: bytes = field(repr=False)
    resumption_psk: bytes = field(repr=False)
    init_secret: bytes = field(repr=False)

    def exporter(self, cs: CipherSuite, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter(Label, Context, Length) of section 8.5."""
        return expand_with_label(cs, derive_secret(cs, self.exporter_secret, label), b"exported", cs.hash(context),
                                 length)

    def external_key_pair(self, cs: CipherSuite) -> tuple[bytes, bytes]:
        """(external_priv, external_pub) for external joins (section 8.3)."""
        return cs.derive_key_pair(self.external_secret)


def from_joiner(cs: CipherSuite, joiner: bytes, psk_secret: bytes, group_context: bytes) -> EpochSecrets:
    """The epoch's secrets given the joiner secret (what a new member learns from a Welcome)."""
    member_prk = cs.kdf_extract(joiner, psk_secret)
    epoch = expand_with_label(cs, member_prk, b"epoch", group_context, cs.hash_len)

    def d(label: bytes) -> bytes:
        return derive_secret(cs, epoch, label)

    return EpochSecrets(
        joiner_secret=joiner,
        welcome_secret=derive_secret(cs, member_prk, b"welcome"),
        sender_data_secret=d(b"sender data"),
        encryption_secret=d(b"encryption"),
        exporter_secret=d(b"exporter"),
        epoch_authenticator=d(b"authentication"),
        external_secret=d(b"external"),
        confirmation_key=d(b"confirm"),
        membership_key=d(b"membership"),
        resumption_psk=d(b"resumption"),
        init_secret=d(b"init"),
    )


def advance(
    cs: CipherSuite, init_secret: bytes, commit_secret: bytes, psk_secret: bytes, group_context: bytes
) -> EpochSecrets:
    """The next epoch's secrets from the previous init_secret (section 8, figure 22)."""
    return from_joiner(cs, joiner_secret(cs, init_secret, commit_secret, group_context), psk_secret, group_context)


def external_init_sender(cs: CipherSuite, external_pub: bytes) -> tuple[bytes, bytes]:
    """For a joiner by external commit: (kem_output for the ExternalInit proposal, init_secret)."""
    return cs.hpke_export_sender(external_pub, b"", EXTERNAL_INIT_LABEL, cs.hash_len)


def external_init_receiver(cs: CipherSuite, external_priv: bytes, kem_output: bytes) -> bytes:
    """For members processing an ExternalInit: the init_secret the joiner chose."""
    return cs.hpke_export_receiver(external_priv, kem_output, b"", EXTERNAL_INIT_LABEL, cs.hash_len)
