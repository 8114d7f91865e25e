"""Creating KeyPackages and holding their private halves until a Welcome arrives (RFC 9420 section 10).

The signature key stays behind the `Signer`; only the HPKE init and leaf keys, which MLS itself must use, are
held here, and never shown in repr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.crypto import CipherSuite, Signer, sign_with_label
from gateway.protocol.mls.extensions import Extension
from gateway.protocol.mls.key_package import (
    KEY_PACKAGE_SIGN_LABEL,
    LEAF_NODE_SIGN_LABEL,
    Capabilities,
    KeyPackage,
    LeafNode,
    Lifetime,
)
from gateway.protocol.mls.wire import LeafNodeSource, ProtocolVersion

DEFAULT_LIFETIME = Lifetime(0, (1 << 64) - 1)


def default_capabilities(cs: CipherSuite, credential: Credential) -> Capabilities:
    return Capabilities((ProtocolVersion.MLS10,), (cs.suite_id,), (), (), (credential.credential_type,))


@dataclass(frozen=True)
class KeyPackageBundle:
    key_package: KeyPackage
    init_priv: bytes = field(repr=False)
    encryption_priv: bytes = field(repr=False)


def sign_leaf_node(signer: Signer, leaf: LeafNode, group_id: bytes | None = None,
                   leaf_index: int | None = None) -> LeafNode:
    sig = sign_with_label(signer, LEAF_NODE_SIGN_LABEL, leaf.tbs(group_id, leaf_index))
    return LeafNode(leaf.encryption_key, leaf.signature_key, leaf.credential, leaf.capabilities,
                    leaf.leaf_node_source, leaf.lifetime, leaf.parent_hash, leaf.extensions, sig)


def create_key_package(
    cs: CipherSuite,
    signer: Signer,
    credential: Credential,
    *,
    capabilities: Capabilities | None = None,
    lifetime: Lifetime = DEFAULT_LIFETIME,
    leaf_extensions: tuple[Extension, ...] = (),
    extensions: tuple[Extension, ...] = (),
) -> KeyPackageBundle:
    init_priv, init_pub = cs.derive_key_pair(_random(cs))
    enc_priv, enc_pub = cs.derive_key_pair(_random(cs))
    caps = capabilities if capabilities is not None else default_capabilities(cs, credential)
    leaf = sign_leaf_node(signer, LeafNode(enc_pub, signer.public_key, credential, caps, LeafNodeSource.KEY_PACKAGE,
                                           lifetime, None, leaf_extensions))
    unsigned = KeyPackage(ProtocolVersion.MLS10, cs.suite_id, init_pub, leaf, extensions)
    kp = KeyPackage(unsigned.version, unsigned.cipher_suite, unsigned.init_key, unsigned.leaf_node,
                    unsigned.extensions, sign_with_label(signer, KEY_PACKAGE_SIGN_LABEL, unsigned.tbs()))
    return KeyPackageBundle(kp, init_priv, enc_priv)


def _random(cs: CipherSuite) -> bytes:
    return os.urandom(cs.hash_len)
