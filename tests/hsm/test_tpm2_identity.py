"""TPM identity keys on a real swtpm: create/load for handle= and blob= references, signatures checked with
`cryptography`, attributes checked independently with tpm2-tools, and every refusal (existing key, missing key,
wrong type, exportable key, foreign blob) raising our own error with the URI."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_RH, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME

import hsm
from hsm import tpm2_context
from hsm.api import IdentityKey, KeyAlgorithm
from hsm.errors import BadKeyUri, KeyExists, KeyNotFound, KeyPolicyViolation, WrongKeyType
from hsm.tpm2_backend import create_identity_key, identity_template, load_identity_key
from hsm.uri import Tpm2Ref
from tests.support.swtpm import SwTpm

HANDLE = 0x81010001


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm.start(tmp_path) as t:
        yield t
        tpm2_context.close(t.tcti)


def handle_uri(tpm: SwTpm, handle: int = HANDLE) -> str:
    return f"tpm2:handle={handle:#x}?tcti={tpm.tcti}"


def blob_uri(tpm: SwTpm, path: Path) -> str:
    return f"tpm2:blob={path}?tcti={tpm.tcti}"


def verify(key: IdentityKey, sig: bytes, data: bytes) -> None:
    pub = key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))


def readpublic(tpm: SwTpm, handle: int) -> dict[str, str]:
    """`tpm2_readpublic` output as {field: value}; nested `value:` lines are folded into their parent."""
    out = subprocess.run(["tpm2_readpublic", "-T", tpm.tcti, "-c", f"{handle:#x}"], check=True, capture_output=True,
                         text=True).stdout
    fields: dict[str, str] = {}
    parent = ""
    for line in out.splitlines():
        name, _, value = line.strip().partition(":")
        if line.startswith(" "):
            if name == "value":
                fields[parent] = value.strip()
        else:
            parent = name
            fields[name] = value.strip()
    return fields


def persist_custom(tpm: SwTpm, template: Any, handle: int) -> None:
    """Make a key from `template` under the owner primary and persist it, bypassing our create checks."""
    with tpm2_context.tpm_session(Tpm2Ref(handle=handle, tcti=tpm.tcti), "test setup") as esys, \
            tpm2_context.primary(esys) as parent:
        private, public, *_ = esys.create(parent, None, template)
        obj = esys.load(parent, private, public)
        with tpm2_context.transient(esys, obj):
            esys.tr_close(esys.evict_control(ESYS_TR.OWNER, obj, handle))


def custom_blob(tpm: SwTpm, template: Any, path: Path) -> None:
    with tpm2_context.tpm_session(Tpm2Ref(blob=path, tcti=tpm.tcti), "test setup") as esys, \
            tpm2_context.primary(esys) as parent:
        private, public, *_ = esys.create(parent, None, template)
    path.write_bytes(TSSPrivKey(private, public, empty_auth=True, parent=int(TPM2_RH.OWNER)).to_pem())


def test_handle_key_signs_verifiable_p256_der(tpm: SwTpm) -> None:
    key = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    assert isinstance(key, IdentityKey)
    assert key.algorithm is KeyAlgorithm.ECDSA_P256
    pub = key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    sig = key.sign(b"certificate signing request")
    assert sig[0] == 0x30  # DER SEQUENCE
    verify(key, sig, b"certificate signing request")
    with pytest.raises(InvalidSignature):
        verify(key, sig, b"another message")


def test_handle_key_reloads_with_same_public_key(tpm: SwTpm) -> None:
    created = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    loaded = hsm.load_identity_key(handle_uri(tpm))  # through the dispatcher, as the daemon does
    assert loaded.public_key() == created.public_key()
    verify(created, loaded.sign(b"x" * 1000), b"x" * 1000)


def test_blob_key_is_tss2_pem_and_reloads(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "identity.tpm"
    created = create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=False)
    assert path.read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----\n")
    assert path.stat().st_mode & 0o077 == 0
    loaded = load_identity_key(blob_uri(tpm, path))
    assert loaded.public_key() == created.public_key()
    sig = loaded.sign(b"relay token")
    verify(created, sig, b"relay token")
    # blob= keys never take a persistent handle
    persistent = subprocess.run(["tpm2_getcap", "-T", tpm.tcti, "handles-persistent"], check=True,
                                capture_output=True, text=True).stdout
    assert persistent.strip() == ""


def test_blob_key_file_loads_with_tpm2_pytss_tsskey(tpm: SwTpm, tmp_path: Path) -> None:
    """Independent reader: tpm2-pytss's TSSPrivKey derives the parent itself and loads our file; its signature
    verifies under our public key."""
    path = tmp_path / "identity.tpm"
    key = create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=False)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"interop")
    with tpm2_context.tpm_session(Tpm2Ref(blob=path, tcti=tpm.tcti), "test") as esys:
        handle = TSSPrivKey.from_pem(path.read_bytes()).load(esys)
        with tpm2_context.transient(esys, handle):
            sig = esys.sign(handle, TPM2B_DIGEST(digest.finalize()), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), None)
    r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
    s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
    verify(key, encode_dss_signature(r, s), b"interop")


def test_signatures_are_randomised_and_all_verify(tpm: SwTpm) -> None:
    key = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    sigs = {key.sign(b"same") for _ in range(5)}
    assert len(sigs) == 5  # ECDSA with a fresh nonce each time
    for sig in sigs:
        verify(key, sig, b"same")


def test_tpm2_readpublic_shows_non_exportable_signing_key(tpm: SwTpm) -> None:
    key = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    fields = readpublic(tpm, HANDLE)
    attrs = set(fields["attributes"].split("|"))
    assert {"fixedtpm", "fixedparent", "sensitivedataorigin", "userwithauth", "sign"} <= attrs
    assert not attrs & {"decrypt", "restricted"}
    assert fields["type"] == "ecc"
    assert fields["curve-id"] == "NIST p256"
    numbers = key.public_key().public_numbers()
    assert isinstance(numbers, ec.EllipticCurvePublicNumbers)
    assert int(fields["x"], 16) == numbers.x and int(fields["y"], 16) == numbers.y


@pytest.mark.parametrize("kind", ["handle", "blob"])
def test_attributes_read_back_and_info(tpm: SwTpm, tmp_path: Path, kind: str) -> None:
    uri = handle_uri(tpm) if kind == "handle" else blob_uri(tpm, tmp_path / "id.tpm")
    key = create_identity_key(uri, KeyAlgorithm.ECDSA_P256, force=False)
    attrs = key.attributes()
    assert attrs.as_dict() == {"sensitive": True, "extractable": False, "never_extractable": True, "local": True}
    info = key.info()
    assert (info.role, info.backend, info.algorithm) == ("identity", "tpm2", "ecdsa-p256")
    assert info.uri == Tpm2Ref.parse(uri).redacted()
    assert info.public_key_pem is not None and info.public_key_pem.startswith("-----BEGIN PUBLIC KEY-----")


def test_ed25519_is_refused_with_a_clear_message(tpm: SwTpm) -> None:
    with pytest.raises(WrongKeyType, match="a TPM has no Ed25519") as err:
        create_identity_key(handle_uri(tpm), KeyAlgorithm.ED25519, force=False)
    assert err.value.uri == Tpm2Ref.parse(handle_uri(tpm)).redacted()


def test_sealed_reference_is_not_an_identity_key(tpm: SwTpm, tmp_path: Path) -> None:
    with pytest.raises(BadKeyUri, match="handle="):
        create_identity_key(f"tpm2:sealed={tmp_path / 's'}?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256, force=False)


def test_existing_handle_needs_force(tpm: SwTpm) -> None:
    first = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    with pytest.raises(KeyExists, match="0x81010001"):
        create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    assert load_identity_key(handle_uri(tpm)).public_key() == first.public_key()  # untouched
    second = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=True)
    assert second.public_key() != first.public_key()
    assert load_identity_key(handle_uri(tpm)).public_key() == second.public_key()


def test_existing_blob_needs_force(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "id.tpm"
    first = create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=False)
    before = path.read_bytes()
    with pytest.raises(KeyExists, match="already exists"):
        create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=False)
    assert path.read_bytes() == before
    second = create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=True)
    assert second.public_key() != first.public_key()


def test_key_replaced_under_a_loaded_handle_is_not_used(tpm: SwTpm) -> None:
    old = create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=False)
    create_identity_key(handle_uri(tpm), KeyAlgorithm.ECDSA_P256, force=True)
    with pytest.raises(KeyNotFound, match="replaced"):
        old.sign(b"data")


def test_missing_handle_is_key_not_found(tpm: SwTpm) -> None:
    with pytest.raises(KeyNotFound, match="0x81010009") as err:
        load_identity_key(handle_uri(tpm, 0x81010009))
    assert err.value.uri is not None and tpm.tcti in err.value.uri


def test_missing_blob_is_key_not_found(tpm: SwTpm, tmp_path: Path) -> None:
    with pytest.raises(KeyNotFound, match="does not exist"):
        load_identity_key(blob_uri(tpm, tmp_path / "nope.tpm"))


def test_garbage_blob_is_wrong_key_type(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "garbage.tpm"
    path.write_bytes(b"-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")
    with pytest.raises(WrongKeyType, match="TSS2 PRIVATE KEY"):
        load_identity_key(blob_uri(tpm, path))


def test_blob_from_another_tpm_is_refused(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "id.tpm"
    create_identity_key(blob_uri(tpm, path), KeyAlgorithm.ECDSA_P256, force=False)
    with SwTpm.start(tmp_path / "other") as other:
        try:
            with pytest.raises(KeyNotFound, match="not made by this TPM") as err:
                load_identity_key(blob_uri(other, path))
            assert err.value.rc is not None
        finally:
            tpm2_context.close(other.tcti)


def _template(**change: Any) -> Any:
    pub = identity_template()
    area = pub.publicArea
    for name, value in change.items():
        if name == "curve":
            area.parameters.eccDetail.curveID = value
        else:
            setattr(area, name, value)
    return pub


EXPORTABLE = (TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT)


def test_exportable_persistent_key_is_refused(tpm: SwTpm) -> None:
    persist_custom(tpm, _template(objectAttributes=EXPORTABLE), HANDLE)
    with pytest.raises(KeyPolicyViolation, match="fixedTPM"):
        load_identity_key(handle_uri(tpm))


def test_exportable_blob_key_is_refused(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "weak.tpm"
    custom_blob(tpm, _template(objectAttributes=EXPORTABLE), path)
    with pytest.raises(KeyPolicyViolation):
        load_identity_key(blob_uri(tpm, path))


def test_other_curve_is_wrong_key_type(tpm: SwTpm) -> None:
    persist_custom(tpm, _template(curve=TPM2_ECC.NIST_P384), HANDLE)
    with pytest.raises(WrongKeyType, match="P-256"):
        load_identity_key(handle_uri(tpm))


def test_rsa_key_is_wrong_key_type(tpm: SwTpm) -> None:
    persist_custom(tpm, "rsa2048", HANDLE)
    with pytest.raises(WrongKeyType, match="not ECC"):
        load_identity_key(handle_uri(tpm))


def test_decrypt_key_is_wrong_key_type(tpm: SwTpm) -> None:
    attrs = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
             | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.DECRYPT)
    template = _template(objectAttributes=attrs)
    template.publicArea.parameters.eccDetail.scheme.scheme = TPM2_ALG.NULL
    persist_custom(tpm, template, HANDLE)
    with pytest.raises(WrongKeyType, match="signing key"):
        load_identity_key(handle_uri(tpm))
