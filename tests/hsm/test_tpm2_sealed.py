"""TPM storage keys on a real swtpm: a sealed 32-byte secret, optionally PCR-bound, used for AES key wrap with
padding. Extending a bound PCR (with tpm2-tools, as a boot change would) must make unwrap fail with UnsealFailed
naming the PCR; corrupt or foreign wrapped blobs raise UnwrapFailed; sealed blobs are refused elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
from tpm2_pytss.types import TPML_PCR_SELECTION

import hsm
from hsm import tpm2_context
from hsm.api import StorageKey
from hsm.errors import BadKeyUri, KeyExists, KeyNotFound, UnsealFailed, UnwrapFailed, WrongKeyType
from hsm.tpm2_backend import create_storage_key, load_storage_key
from hsm.uri import Tpm2Ref
from tests.support.swtpm import SwTpm


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm.start(tmp_path) as t:
        yield t
        tpm2_context.close(t.tcti)


def sealed_uri(tpm: SwTpm, path: Path, pcrs: str = "") -> str:
    return f"tpm2:sealed={path}?tcti={tpm.tcti}" + (f"&pcrs={pcrs}" if pcrs else "")


def pcr_extend(tpm: SwTpm, index: int, data: bytes = b"new boot component") -> None:
    digest = hashlib.sha256(data).hexdigest()
    subprocess.run(["tpm2_pcrextend", "-T", tpm.tcti, f"{index}:sha256={digest}"], check=True, capture_output=True)


@pytest.mark.parametrize("size", [1, 16, 32, 33, 64])
def test_wrap_unwrap_round_trip(tpm: SwTpm, tmp_path: Path, size: int) -> None:
    key = create_storage_key(sealed_uri(tpm, tmp_path / "storage.tpm"), force=False)
    assert isinstance(key, StorageKey)
    dek = bytes(range(size))
    wrapped = key.wrap(dek)
    if size >= 8:  # a 1-byte secret turns up in 16 random bytes by chance (~6%): only longer ones say anything
        assert dek not in wrapped
    assert len(wrapped) == 8 + -(-size // 8) * 8  # RFC 5649: 8-byte AIV + padded input
    assert key.unwrap(wrapped) == dek


@settings(max_examples=int(os.environ.get("AGW_HYPOTHESIS_EXAMPLES", "20")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dek=st.binary(min_size=1, max_size=200), flip=st.integers(min_value=0))
def test_wrap_round_trips_and_any_bit_flip_fails(tpm: SwTpm, tmp_path: Path, dek: bytes, flip: int) -> None:
    path = tmp_path / "prop.tpm"
    key = load_storage_key(sealed_uri(tpm, path)) if path.exists() else create_storage_key(sealed_uri(tpm, path))
    wrapped = key.wrap(dek)
    assert key.unwrap(wrapped) == dek
    bit = flip % (len(wrapped) * 8)
    tampered = bytearray(wrapped)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(UnwrapFailed):
        key.unwrap(bytes(tampered))


def test_reloaded_key_unwraps_and_blob_holds_no_secret(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "storage.tpm"
    wrapped = create_storage_key(sealed_uri(tpm, path), force=False).wrap(b"k" * 32)
    reloaded = hsm.load_storage_key(sealed_uri(tpm, path))
    assert reloaded.unwrap(wrapped) == b"k" * 32
    assert path.stat().st_mode & 0o077 == 0
    head = json.loads(path.read_bytes().partition(b"\n")[0])
    assert head["format"] == "agw-tpm2-sealed" and head["pcrs"] == ""


def test_two_storage_keys_have_different_secrets(tpm: SwTpm, tmp_path: Path) -> None:
    one = create_storage_key(sealed_uri(tpm, tmp_path / "a.tpm"), force=False)
    two = create_storage_key(sealed_uri(tpm, tmp_path / "b.tpm"), force=False)
    with pytest.raises(UnwrapFailed, match="another storage key"):
        two.unwrap(one.wrap(b"d" * 32))


def test_corrupt_wrapped_blob_is_unwrap_failed(tpm: SwTpm, tmp_path: Path) -> None:
    key = create_storage_key(sealed_uri(tpm, tmp_path / "s.tpm"), force=False)
    wrapped = bytearray(key.wrap(b"d" * 32))
    wrapped[10] ^= 1
    with pytest.raises(UnwrapFailed) as err:
        key.unwrap(bytes(wrapped))
    assert err.value.uri == Tpm2Ref.parse(sealed_uri(tpm, tmp_path / "s.tpm")).redacted()
    with pytest.raises(UnwrapFailed):
        key.unwrap(b"short")


def test_pcr_bound_round_trip_and_policy(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "s.tpm"
    key = create_storage_key(sealed_uri(tpm, path, "sha256:7,16"), force=False)
    wrapped = key.wrap(b"d" * 32)
    assert key.unwrap(wrapped) == b"d" * 32
    head = json.loads(path.read_bytes().partition(b"\n")[0])
    assert head["pcrs"] == "sha256:7,16" and sorted(head["pcr_values"]) == ["16", "7"]
    # the URI may omit pcrs=: the blob knows its policy
    assert load_storage_key(sealed_uri(tpm, path)).unwrap(wrapped) == b"d" * 32
    # extending an unbound PCR changes nothing
    pcr_extend(tpm, 8)
    assert key.unwrap(wrapped) == b"d" * 32


def test_extending_a_bound_pcr_makes_unseal_fail(tpm: SwTpm, tmp_path: Path) -> None:
    key = create_storage_key(sealed_uri(tpm, tmp_path / "s.tpm", "sha256:7,16"), force=False)
    wrapped = key.wrap(b"d" * 32)
    pcr_extend(tpm, 16)
    # the same handle fails at once: the secret is unsealed on every call, never cached
    with pytest.raises(UnsealFailed) as err:
        key.unwrap(wrapped)
    message = str(err.value)
    assert "PCR sha256:16 changed" in message and "sha256:7,16" in message
    assert err.value.rc is not None and err.value.rc.startswith("0x")
    with pytest.raises(UnsealFailed):
        key.wrap(b"x" * 32)
    with pytest.raises(UnsealFailed, match="PCR sha256:16 changed"):
        load_storage_key(sealed_uri(tpm, tmp_path / "s.tpm", "sha256:7,16")).unwrap(wrapped)


def test_pcr_bound_object_cannot_be_unsealed_by_password(tpm: SwTpm, tmp_path: Path) -> None:
    """Without userWithAuth, the empty password does not open the object: only the PCR policy does."""
    path = tmp_path / "s.tpm"
    key = create_storage_key(sealed_uri(tpm, path, "sha256:7"), force=False)
    blob = key._blob
    ref = Tpm2Ref.parse(sealed_uri(tpm, path))
    with tpm2_context.tpm_session(ref, "test") as esys:
        with tpm2_context.primary(esys) as parent:
            obj = esys.load(parent, blob.private, blob.public)
        with tpm2_context.transient(esys, obj), pytest.raises(TSS2_Exception):
            esys.unseal(obj)


def test_sealed_secret_is_the_wrapping_key(tpm: SwTpm, tmp_path: Path) -> None:
    """Sanity check of the seal itself: unsealing by hand yields the 32-byte key that unwraps our blobs."""
    path = tmp_path / "s.tpm"
    key = create_storage_key(sealed_uri(tpm, path), force=False)
    wrapped = key.wrap(b"d" * 24)
    blob = key._blob
    with tpm2_context.tpm_session(Tpm2Ref.parse(sealed_uri(tpm, path)), "test") as esys:
        with tpm2_context.primary(esys) as parent:
            obj = esys.load(parent, blob.private, blob.public)
        with tpm2_context.transient(esys, obj):
            secret = bytes(esys.unseal(obj))
    assert len(secret) == 32
    assert aes_key_unwrap_with_padding(secret, wrapped) == b"d" * 24


def unseal_in_clear(tcti: str, path: Path, blob: Any) -> bytes:
    """Unseal by hand without parameter encryption: the control for the wire test."""
    with tpm2_context.tpm_session(Tpm2Ref(sealed=path, tcti=tcti), "test") as esys:
        with tpm2_context.primary(esys) as parent:
            obj = esys.load(parent, blob.private, blob.public)
        with tpm2_context.transient(esys, obj):
            if not blob.pcrs:
                return bytes(esys.unseal(obj))
            session = esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None, TPM2_ALG.SHA256)
            with tpm2_context.transient(esys, session):
                esys.policy_pcr(session, None, TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, blob.pcrs))))
                return bytes(esys.unseal(obj, session1=session))


@pytest.mark.parametrize("pcrs", ["", "sha256:7"])
def test_secret_never_crosses_the_wire_in_clear(tpm: SwTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                pcrs: str) -> None:
    """The pcap TCTI records every command and response bytes: seal, wrap and unwrap must not show the secret
    (GetRandom, Create and Unseal run with an encrypting salted session); an unencrypted unseal shows it."""
    path = tmp_path / "s.tpm"
    sniffed = f"pcap:{tpm.tcti}"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(tmp_path / "wire.pcap"))
    key = load_storage_key(create_storage_key(
        f"tpm2:sealed={path}?tcti={sniffed}" + (f"&pcrs={pcrs}" if pcrs else ""), force=False).uri)
    assert key.unwrap(key.wrap(b"d" * 32)) == b"d" * 32
    tpm2_context.close(sniffed)
    wire = (tmp_path / "wire.pcap").read_bytes()
    assert bytes(key._blob.private.marshal()) in wire  # the capture did record our traffic
    monkeypatch.setenv("TCTI_PCAP_FILE", str(tmp_path / "control.pcap"))
    secret = unseal_in_clear(sniffed, path, key._blob)
    tpm2_context.close(sniffed)
    assert len(secret) == 32
    assert secret in (tmp_path / "control.pcap").read_bytes()
    assert secret not in wire


def test_existing_blob_needs_force(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "s.tpm"
    first = create_storage_key(sealed_uri(tpm, path), force=False)
    wrapped = first.wrap(b"d" * 32)
    with pytest.raises(KeyExists, match="already exists"):
        create_storage_key(sealed_uri(tpm, path), force=False)
    assert load_storage_key(sealed_uri(tpm, path)).unwrap(wrapped) == b"d" * 32
    second = create_storage_key(sealed_uri(tpm, path), force=True)
    with pytest.raises(UnwrapFailed):
        second.unwrap(wrapped)


def test_missing_directory_is_created_owner_only(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "agw" / "storage.tpm"
    key = create_storage_key(sealed_uri(tpm, path), force=False)
    assert key.unwrap(key.wrap(b"d" * 32)) == b"d" * 32
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_missing_blob_is_key_not_found(tpm: SwTpm, tmp_path: Path) -> None:
    with pytest.raises(KeyNotFound, match="does not exist"):
        load_storage_key(sealed_uri(tpm, tmp_path / "none.tpm"))


def test_garbage_blob_is_wrong_key_type(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "junk.tpm"
    path.write_bytes(b'{"format": "agw-tpm2-sealed", "version": 1}\n\x00\x01')
    with pytest.raises(WrongKeyType, match="is not an agw-tpm2-sealed blob"):
        load_storage_key(sealed_uri(tpm, path))


def test_uri_pcrs_must_match_the_blob(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "s.tpm"
    create_storage_key(sealed_uri(tpm, path, "sha256:7"), force=False)
    with pytest.raises(BadKeyUri, match="sealed to sha256:7"):
        load_storage_key(sealed_uri(tpm, path, "sha256:7,16"))


def test_sealed_blob_from_another_tpm_is_refused(tpm: SwTpm, tmp_path: Path) -> None:
    path = tmp_path / "s.tpm"
    create_storage_key(sealed_uri(tpm, path), force=False)
    with SwTpm.start(tmp_path / "other") as other:
        try:
            with pytest.raises(KeyNotFound, match="not made by this TPM"):
                load_storage_key(sealed_uri(other, path))
        finally:
            tpm2_context.close(other.tcti)


def test_identity_reference_is_not_a_storage_key(tpm: SwTpm) -> None:
    with pytest.raises(BadKeyUri, match="sealed="):
        create_storage_key(f"tpm2:handle=0x81010001?tcti={tpm.tcti}", force=False)


def test_info_reports_non_extractable_sealed_object(tpm: SwTpm, tmp_path: Path) -> None:
    key = create_storage_key(sealed_uri(tpm, tmp_path / "s.tpm", "sha256:7"), force=False)
    info = key.info()
    assert (info.role, info.backend, info.algorithm) == ("storage", "tpm2", "aes-256-kwp")
    # fixedTPM|fixedParent: not extractable; the secret came in from TPM2_GetRandom via the host, so not `local`
    assert info.attributes.as_dict() == {"sensitive": False, "extractable": False, "never_extractable": True,
                                         "local": False}
    assert info.public_key_pem is None
