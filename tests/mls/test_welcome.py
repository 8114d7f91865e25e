"""welcome.json: decrypting a Welcome and verifying its GroupInfo, suites 1 and 3.

Format per entry: cipher_suite, init_priv, key_package (MLSMessage holding the joiner's KeyPackage),
signer_pub (the GroupInfo signer's signature key), welcome (MLSMessage holding the Welcome). Checks: both
messages re-encode exactly; init_priv matches the KeyPackage's init key; the joiner's GroupSecrets decrypt, the
GroupInfo decrypts, its signature verifies with signer_pub and its confirmation tag with the derived
confirmation key. Plus a round trip of our own Welcome creation, and refusals (wrong key, wrong signer).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto, hpke, welcome
from gateway.protocol.mls.errors import MlsError, MlsVerificationError
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.transcript import confirmation_tag
from gateway.protocol.mls.welcome_structs import GroupInfo, Welcome

from .conftest import unhex, vector_params


def _load(v: dict[str, Any]) -> tuple[KeyPackage, Welcome]:
    kp_msg = MLSMessage.from_bytes(unhex(v["key_package"]))
    w_msg = MLSMessage.from_bytes(unhex(v["welcome"]))
    assert kp_msg.to_bytes() == unhex(v["key_package"])
    assert w_msg.to_bytes() == unhex(v["welcome"])
    assert isinstance(kp_msg.body, KeyPackage) and isinstance(w_msg.body, Welcome)
    return kp_msg.body, w_msg.body


@pytest.mark.parametrize("v", vector_params("welcome.json"))
def test_welcome_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])
    kp, w = _load(v)
    init_priv = unhex(v["init_priv"])
    assert cs.hpke_public_key(init_priv) == kp.init_key
    opened = welcome.open_welcome(cs, w, kp, init_priv)
    welcome.verify_group_info(cs, opened.group_info, unhex(v["signer_pub"]))
    gc = opened.group_info.group_context
    assert gc.cipher_suite == v["cipher_suite"]
    assert confirmation_tag(cs, opened.epoch_secrets.confirmation_key, gc.confirmed_transcript_hash) == \
        opened.group_info.confirmation_tag
    with pytest.raises(MlsVerificationError):
        welcome.verify_group_info(cs, opened.group_info, crypto.Ed25519Signer.generate().public_key)
    with pytest.raises(MlsVerificationError):
        welcome.open_welcome(cs, w, kp, hpke.generate_key_pair()[0])


@pytest.mark.parametrize("v", vector_params("welcome.json"))
def test_welcome_round_trip(v: dict[str, Any]) -> None:
    """Re-encrypt the vector's GroupInfo to the same KeyPackage with our own Welcome creation, and open it."""
    cs = crypto.get_suite(v["cipher_suite"])
    kp, w = _load(v)
    init_priv = unhex(v["init_priv"])
    opened = welcome.open_welcome(cs, w, kp, init_priv)
    joiner = opened.group_secrets.joiner_secret
    mine = welcome.create_welcome(cs, opened.group_info, joiner, opened.psk_secret,
                                  [welcome.NewMember(kp, b"\x01" * cs.hash_len)])
    again = welcome.open_welcome(cs, Welcome.from_bytes(mine.to_bytes()), kp, init_priv)
    assert again.group_info == opened.group_info
    assert again.group_secrets.path_secret == b"\x01" * cs.hash_len
    assert again.epoch_secrets == opened.epoch_secrets
    forged_gi = GroupInfo(opened.group_info.group_context, (), bytes(cs.hash_len), 0, b"")
    forged = welcome.create_welcome(cs, forged_gi, joiner, opened.psk_secret, [welcome.NewMember(kp)])
    with pytest.raises(MlsVerificationError):  # a wrong confirmation tag
        welcome.open_welcome(cs, forged, kp, init_priv)
    other = Welcome(w.cipher_suite, (), w.encrypted_group_info)
    with pytest.raises(MlsError):
        welcome.open_welcome(cs, other, kp, init_priv)
