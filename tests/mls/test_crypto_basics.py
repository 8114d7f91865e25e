"""crypto-basics.json: the labelled crypto helpers of RFC 9420 section 5, suites 1 and 3.

Format per entry: cipher_suite and one object per function:
ref_hash{label, value, out}, expand_with_label{secret, label, context, length, out},
derive_secret{secret, label, out}, derive_tree_secret{secret, label, generation, length, out},
sign_with_label{priv, pub, content, label, signature}, encrypt_with_label{priv, pub, label, context, plaintext,
kem_output, ciphertext}. Checks: every `out` recomputed; the signature verifies and Ed25519 (deterministic)
reproduces it; the ciphertext decrypts to the plaintext and a fresh encryption round-trips.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto
from gateway.protocol.mls.errors import MlsVerificationError

from .conftest import unhex, vector_params


@pytest.mark.parametrize("v", vector_params("crypto-basics.json"))
def test_crypto_basics_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])

    rh = v["ref_hash"]
    assert crypto.ref_hash(cs, rh["label"].encode(), unhex(rh["value"])) == unhex(rh["out"])

    ewl = v["expand_with_label"]
    out = crypto.expand_with_label(cs, unhex(ewl["secret"]), ewl["label"].encode(), unhex(ewl["context"]),
                                   ewl["length"])
    assert out == unhex(ewl["out"])

    ds = v["derive_secret"]
    assert crypto.derive_secret(cs, unhex(ds["secret"]), ds["label"].encode()) == unhex(ds["out"])

    dts = v["derive_tree_secret"]
    out = crypto.derive_tree_secret(cs, unhex(dts["secret"]), dts["label"].encode(), dts["generation"],
                                    dts["length"])
    assert out == unhex(dts["out"])

    swl = v["sign_with_label"]
    signer = crypto.Ed25519Signer.from_seed(unhex(swl["priv"]))
    assert signer.public_key == unhex(swl["pub"])
    label, content, sig = swl["label"].encode(), unhex(swl["content"]), unhex(swl["signature"])
    assert crypto.verify_with_label(cs, unhex(swl["pub"]), label, content, sig)
    assert crypto.sign_with_label(signer, label, content) == sig
    assert not crypto.verify_with_label(cs, unhex(swl["pub"]), label + b"x", content, sig)

    ewl = v["encrypt_with_label"]
    sk, pk = unhex(ewl["priv"]), unhex(ewl["pub"])
    assert cs.hpke_public_key(sk) == pk
    label, context, pt = ewl["label"].encode(), unhex(ewl["context"]), unhex(ewl["plaintext"])
    got = crypto.decrypt_with_label(cs, sk, label, context, unhex(ewl["kem_output"]), unhex(ewl["ciphertext"]))
    assert got == pt
    kem_output, ct = crypto.encrypt_with_label(cs, pk, label, context, pt)
    assert crypto.decrypt_with_label(cs, sk, label, context, kem_output, ct) == pt
    with pytest.raises(MlsVerificationError):
        crypto.decrypt_with_label(cs, sk, label, context + b"x", kem_output, ct)


def test_signer_repr_hides_private_key() -> None:
    seed = bytes(range(32))
    signer = crypto.Ed25519Signer.from_seed(seed)
    assert seed.hex() not in repr(signer)
    assert isinstance(signer, crypto.Signer)
