"""PKCS#11 backend against real SoftHSM2 tokens, checked with OpenSC's pkcs11-tool where a property is claimed."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import hsm
from hsm import pkcs11_worker
from hsm.api import KeyAlgorithm
from hsm.errors import (
    BadKeyUri,
    KeyExists,
    KeyNotFound,
    KeyPolicyViolation,
    LibraryNotFound,
    TokenNotFound,
    UnwrapFailed,
)
from tests.support.softhsm import MODULE, USER_PIN, SoftHsmDir


def verify(pub, sig: bytes, data: bytes) -> None:
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(sig, data)
    else:
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))


def pkcs11_tool(pool: SoftHsmDir, token: str, *args: str) -> str:
    out = subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", token, "--login", "--pin", USER_PIN,
                          *args], env=pool.env, capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_identity_key_generated_on_token_signs_and_is_not_extractable(softhsm_pool, softhsm_token, alg):
    uri = softhsm_pool.uri(softhsm_token, "agw-identity")
    key = hsm.create_identity_key(uri, alg)
    assert key.algorithm is alg
    sig = key.sign(b"hello fleet")
    verify(key.public_key(), sig, b"hello fleet")
    with pytest.raises(InvalidSignature):
        verify(key.public_key(), sig, b"hello fleeT")
    attrs = key.attributes()
    assert (attrs.sensitive, attrs.extractable, attrs.never_extractable, attrs.local) == (True, False, True, True)
    # Loading again goes through the same checks and gives the same public key.
    again = hsm.load_identity_key(uri)
    assert again.public_key() == key.public_key()
    # The independent pkcs11-tool check of these attributes is in tests/cli/test_keys_cli.py, after the
    # creating process has exited.


def test_create_refuses_to_replace_without_force(softhsm_pool, softhsm_token):
    uri = softhsm_pool.uri(softhsm_token, "agw-identity")
    first = hsm.create_identity_key(uri, KeyAlgorithm.ED25519)
    with pytest.raises(KeyExists, match="--force"):
        hsm.create_identity_key(uri, KeyAlgorithm.ED25519)
    second = hsm.create_identity_key(uri, KeyAlgorithm.ECDSA_P256, force=True)
    assert second.public_key() != first.public_key()
    assert hsm.load_identity_key(uri).algorithm is KeyAlgorithm.ECDSA_P256


def test_extractable_identity_key_is_refused(softhsm_pool, softhsm_token):
    subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", softhsm_token, "--login", "--pin", USER_PIN,
                    "--keypairgen", "--key-type", "EC:prime256v1", "--label", "weak", "--id", "09", "--extractable"],
                   env=softhsm_pool.env, check=True, capture_output=True)
    with pytest.raises(KeyPolicyViolation, match="extractable"):
        hsm.load_identity_key(softhsm_pool.uri(softhsm_token, "weak"))


def test_storage_key_wraps_and_unwraps(softhsm_pool, softhsm_token):
    uri = softhsm_pool.uri(softhsm_token, "agw-storage")
    sk = hsm.create_storage_key(uri)
    dek = bytes(range(32))
    blob = sk.wrap(dek)
    assert dek not in blob and len(blob) == 40
    assert hsm.load_storage_key(uri).unwrap(blob) == dek
    info = sk.info()
    assert info.attributes.sensitive and not info.attributes.extractable and info.algorithm == "aes-256"
    corrupt = bytearray(blob)
    corrupt[5] ^= 1
    with pytest.raises(UnwrapFailed):
        sk.unwrap(bytes(corrupt))
    with pytest.raises(UnwrapFailed):
        sk.unwrap(b"short")
    other = hsm.create_storage_key(softhsm_pool.uri(softhsm_token, "other-storage"))
    with pytest.raises(UnwrapFailed):
        other.unwrap(blob)
    with pytest.raises(KeyExists):
        hsm.create_storage_key(uri)
    listing = pkcs11_tool(softhsm_pool, softhsm_token, "--list-objects", "--type", "secrkey")
    block = listing.split("label:      agw-storage")[1].split("Secret Key Object")[0]
    assert "AES length 32" in listing and "sensitive" in block and "never extractable" in block


def test_four_threads_sign_concurrently_through_one_worker(softhsm_pool, softhsm_token):
    key = hsm.create_identity_key(softhsm_pool.uri(softhsm_token, "agw-identity"), KeyAlgorithm.ED25519)
    storage = hsm.create_storage_key(softhsm_pool.uri(softhsm_token, "agw-storage"))
    errors: list[BaseException] = []
    counts = [0] * 4

    def work(i: int) -> None:
        try:
            for n in range(40):
                msg = f"thread {i} message {n}".encode()
                verify(key.public_key(), key.sign(msg), msg)
                if n % 10 == 0:
                    assert storage.unwrap(storage.wrap(bytes([i]) * 32)) == bytes([i]) * 32
                counts[i] += 1
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert counts == [40, 40, 40, 40]
    assert pkcs11_worker.worker_thread_id() not in (None, threading.get_ident())


def test_missing_key_token_and_module_errors_name_the_uri(softhsm_pool, softhsm_token):
    with pytest.raises(KeyNotFound, match=f"token={softhsm_token}") as exc:
        hsm.load_identity_key(softhsm_pool.uri(softhsm_token, "absent"))
    assert "CKR_NO_SUCH_KEY" in str(exc.value)
    with pytest.raises(TokenNotFound, match="token=no-such-token"):
        hsm.load_identity_key(softhsm_pool.uri("no-such-token", "x"))
    with pytest.raises(LibraryNotFound, match=r"/nonexistent/libp11\.so"):
        hsm.load_identity_key("pkcs11:token=t;object=x?module-path=/nonexistent/libp11.so&pin-value=1")
    with pytest.raises(BadKeyUri):
        hsm.load_identity_key("pkcs11:token=t;id=%01")


_WRONG_PIN_SCRIPT = """
import sys, hsm
from hsm.errors import PinIncorrect
try:
    hsm.load_identity_key(sys.argv[1])
except PinIncorrect as exc:
    print("ERROR:", exc)
    sys.exit(3)
"""


def test_wrong_pin_is_reported_without_revealing_it(softhsm_dir):
    softhsm_dir.init_token("pin-test")
    secret_pin = "9999-wrong-PIN-value"
    uri_file = softhsm_dir.uri("pin-test", "agw-identity").replace(str(softhsm_dir.pin_file()),
                                                                    str(softhsm_dir.root / "wrong-pin"))
    (softhsm_dir.root / "wrong-pin").write_text(secret_pin)
    uri_value = f"pkcs11:token=pin-test;object=agw-identity?module-path={MODULE}&pin-value={secret_pin}"
    for uri in (uri_file, uri_value):
        out = subprocess.run([sys.executable, "-c", _WRONG_PIN_SCRIPT, uri], env=softhsm_dir.env,
                             capture_output=True, text=True)
        assert out.returncode == 3, out.stderr
        assert "CKR_PIN_INCORRECT" in out.stdout and "token=pin-test" in out.stdout
        assert secret_pin not in out.stdout + out.stderr


def test_pin_sources(tmp_path, monkeypatch):
    from hsm.errors import PinUnavailable
    from hsm.uri import Pkcs11Uri

    monkeypatch.setenv("AGW_TEST_PIN", "1111")
    assert Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-source=env:AGW_TEST_PIN").read_pin() == "1111"
    (tmp_path / "cred").mkdir()
    (tmp_path / "cred" / "agw-pin").write_text("2222\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "cred"))
    assert Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-source=cred:agw-pin").read_pin() == "2222"
    with pytest.raises(PinUnavailable, match="AGW_NOPE"):
        Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-source=env:AGW_NOPE").read_pin()
    u = Pkcs11Uri.parse("pkcs11:token=a;object=b?pin-value=3333")
    assert "3333" not in u.redacted() and "3333" not in repr(u)
    with pytest.raises(BadKeyUri) as exc:
        Pkcs11Uri.parse("pkcs11:object=b?pin-value=4444")
    assert "4444" not in str(exc.value)


def test_p256_curve_parameters_constant_is_what_python_pkcs11_encodes():
    """The backend compares CKA_EC_PARAMS with a constant so that loading a key needs no asn1crypto."""
    from pkcs11.util.ec import encode_named_curve_parameters

    from hsm import pkcs11_backend

    assert pkcs11_backend._P256_PARAMS == encode_named_curve_parameters(pkcs11_backend._P256_OID)


@pytest.mark.parametrize("size", [0, 32, 65, 127, 128, 255, 256, 300])
def test_ec_point_der_decoder_reads_what_asn1crypto_writes(size):
    from asn1crypto.core import OctetString

    from hsm.pkcs11_backend import _der_octet_string

    data = bytes(range(256)) * 2
    assert _der_octet_string(OctetString(data[:size]).dump()) == data[:size]


@pytest.mark.parametrize("der", [
    b"", b"\x04", b"\x03\x02\x00\x01",  # empty, no length, a BIT STRING
    b"\x04\x21" + bytes(32), b"\x04\x20" + bytes(33),  # too short, trailing byte
    b"\x04\x81\x20" + bytes(32),  # long form for a short length (not DER)
    b"\x04\x82\x00\x81" + bytes(129),  # a leading zero length byte (not DER)
    b"\x04\x83\x00\x00\x20" + bytes(32), b"\x04\x80",  # three length bytes, indefinite length
])
def test_ec_point_der_decoder_rejects_anything_else(der):
    from hsm.pkcs11_backend import _der_octet_string

    with pytest.raises(ValueError):
        _der_octet_string(der)
