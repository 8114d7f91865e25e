"""RFC 9180 appendix A vectors for base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 with AES-128-GCM,
ChaCha20-Poly1305 and export-only; plus a cross-check against `cryptography`'s own single-shot HPKE.

Format per entry: mode, kem_id, kdf_id, aead_id, info, ikmE/pkEm/skEm, ikmR/pkRm/skRm, enc, shared_secret,
key_schedule_context, secret, key, base_nonce, exporter_secret, encryptions[{seq, pt, aad, nonce, ct}],
exports[{exporter_context, L, exported_value}]. Other modes and KEMs are filtered out of the parametrisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke as lib_hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway.protocol.mls import hpke
from gateway.protocol.mls.errors import MlsCryptoError, MlsVerificationError

HPKE_VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "hpke" / "rfc9180-appendix-a.json"


def _params() -> list[Any]:
    with HPKE_VECTORS.open() as f:
        entries = json.load(f)
    out = [
        pytest.param(e, id=f"aead{e['aead_id']}")
        for e in entries
        if e["mode"] == 0 and e["kem_id"] == 0x20 and e["kdf_id"] == 1 and e["aead_id"] in (1, 3, 0xFFFF)
    ]
    assert len(out) == 3
    return out


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


@pytest.mark.parametrize("v", _params())
def test_rfc9180_base_mode_vector(v: dict[str, Any]) -> None:
    suite = hpke.Hpke(v["aead_id"])
    assert hpke.derive_key_pair(_h(v["ikmE"])) == (_h(v["skEm"]), _h(v["pkEm"]))
    assert hpke.derive_key_pair(_h(v["ikmR"])) == (_h(v["skRm"]), _h(v["pkRm"]))

    shared_secret, enc = hpke.encap(_h(v["pkRm"]), _h(v["ikmE"]))
    assert enc == _h(v["enc"])
    assert shared_secret == _h(v["shared_secret"])
    assert hpke.decap(enc, _h(v["skRm"])) == shared_secret

    info = _h(v["info"])
    ks_context, secret = suite.key_schedule_inputs(shared_secret, info)
    assert ks_context == _h(v["key_schedule_context"])
    assert secret == _h(v["secret"])

    enc2, sender = suite.setup_base_s(_h(v["pkRm"]), info, _h(v["ikmE"]))
    assert enc2 == enc
    receiver = suite.setup_base_r(enc, _h(v["skRm"]), info)
    for ctx in (sender, receiver):
        assert ctx.key == _h(v["key"])
        assert ctx.base_nonce == _h(v["base_nonce"])
        assert ctx.exporter_secret == _h(v["exporter_secret"])

    if v["aead_id"] == hpke.AEAD_EXPORT_ONLY:
        assert "encryptions" not in v
        with pytest.raises(MlsCryptoError):
            sender.seal(b"", b"no AEAD in export-only mode")
    for e in v.get("encryptions", []):
        # Vectors list selected sequence numbers; advance both contexts to each one.
        sender.seq = receiver.seq = e["seq"]
        assert sender._nonce() == _h(e["nonce"])
        assert sender.seal(_h(e["aad"]), _h(e["pt"])) == _h(e["ct"])
        assert receiver.open(_h(e["aad"]), _h(e["ct"])) == _h(e["pt"])
    for x in v["exports"]:
        want = _h(x["exported_value"])
        assert sender.export(_h(x["exporter_context"]), x["L"]) == want
        assert receiver.export(_h(x["exporter_context"]), x["L"]) == want


@pytest.mark.parametrize(
    ("aead_id", "lib_aead"),
    [
        (hpke.AEAD_AES_128_GCM, lib_hpke.AEAD.AES_128_GCM),
        (hpke.AEAD_CHACHA20_POLY1305, lib_hpke.AEAD.CHACHA20_POLY1305),
    ],
)
def test_cross_check_with_cryptography_hpke(aead_id: int, lib_aead: Any) -> None:
    """Our seal opens with the library, and the library's seal opens with ours (single-shot: empty aad)."""
    lib = lib_hpke.Suite(lib_hpke.KEM.X25519, lib_hpke.KDF.HKDF_SHA256, lib_aead)
    ours = hpke.Hpke(aead_id)
    sk, pk = hpke.generate_key_pair()
    info, pt = b"cross-check info", b"attack at dawn"

    enc, ct = ours.seal_base(pk, info, b"", pt)
    assert lib.decrypt(enc + ct, X25519PrivateKey.from_private_bytes(sk), info=info) == pt

    blob = lib.encrypt(pt, X25519PublicKey.from_public_bytes(pk), info=info)
    assert ours.open_base(blob[:32], sk, info, b"", blob[32:]) == pt


def test_open_rejects_tampering_and_small_order_points() -> None:
    suite = hpke.Hpke(hpke.AEAD_AES_128_GCM)
    sk, pk = hpke.generate_key_pair()
    enc, ct = suite.seal_base(pk, b"info", b"aad", b"payload")
    with pytest.raises(MlsVerificationError):
        suite.open_base(enc, sk, b"info", b"aad", ct[:-1] + bytes([ct[-1] ^ 1]))
    with pytest.raises(MlsVerificationError):
        suite.open_base(enc, sk, b"other info", b"aad", ct)
    with pytest.raises(MlsCryptoError):
        suite.open_base(bytes(32), sk, b"info", b"aad", ct)


def test_context_repr_hides_secrets() -> None:
    _, ctx = hpke.Hpke(hpke.AEAD_AES_128_GCM).setup_base_s(hpke.generate_key_pair()[1], b"")
    r = repr(ctx)
    assert ctx.key.hex() not in r and ctx.exporter_secret.hex() not in r
