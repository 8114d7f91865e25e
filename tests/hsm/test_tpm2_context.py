"""The TPM connection: one ESAPI context per TCTI behind a lock (4 threads signing at once), no transient objects or
sessions left behind (swtpm has 3 object slots), TpmUnreachable naming the TCTI and the TSS return code, and
reconnection after the TPM comes back."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsm import tpm2_context
from hsm.api import KeyAlgorithm
from hsm.errors import HardwareError, TpmUnreachable, UnsealFailed
from hsm.tpm2_backend import create_identity_key, create_storage_key, load_identity_key
from tests.support import swtpm as swtpm_support
from tests.support.swtpm import SwTpm, closed_port

# The fixtures other test modules import: exercised here so they stay working.
swtpm = swtpm_support.swtpm
swtpm_tcti = swtpm_support.swtpm_tcti

THREADS = 4
SIGNATURES_PER_THREAD = 15


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[SwTpm]:
    with SwTpm.start(tmp_path) as t:
        yield t
        tpm2_context.close(t.tcti)


def getcap(tpm: SwTpm, what: str) -> str:
    return subprocess.run(["tpm2_getcap", "-T", tpm.tcti, what], check=True, capture_output=True,
                          text=True).stdout.strip()


def assert_nothing_loaded(tpm: SwTpm) -> None:
    assert getcap(tpm, "handles-transient") == ""
    assert getcap(tpm, "handles-loaded-session") == ""
    assert getcap(tpm, "handles-saved-session") == ""


def test_closed_port_is_tpm_unreachable_naming_the_tcti(tmp_path: Path) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={closed_port()}"
    with pytest.raises(TpmUnreachable) as err:
        load_identity_key(f"tpm2:handle=0x81010001?tcti={tcti}")
    assert tcti in str(err.value)
    assert err.value.rc is not None and err.value.rc.startswith("0xa00")  # TSS2 TCTI layer code
    assert err.value.uri == f"tpm2:handle=0x81010001?tcti={tcti}"
    path = tmp_path / "s.tpm"
    with pytest.raises(TpmUnreachable, match="cannot open the TPM"):
        create_storage_key(f"tpm2:sealed={path}?tcti={tcti}", force=False)
    assert not path.exists()
    assert tcti not in tpm2_context.open_tctis()


def test_unknown_tcti_is_tpm_unreachable() -> None:
    with pytest.raises(TpmUnreachable, match="nosuchtcti"):
        load_identity_key("tpm2:handle=0x81010001?tcti=nosuchtcti:whatever")


def test_one_context_per_tcti(tpm: SwTpm, tmp_path: Path) -> None:
    create_identity_key(f"tpm2:handle=0x81010001?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256, force=False)
    create_identity_key(f"tpm2:blob={tmp_path / 'b.tpm'}?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256, force=False)
    create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={tpm.tcti}", force=False)
    assert tpm2_context.open_tctis().count(tpm.tcti) == 1
    tpm2_context.close(tpm.tcti)
    assert tpm.tcti not in tpm2_context.open_tctis()


def test_four_threads_sign_at_once(tpm: SwTpm, tmp_path: Path) -> None:
    """Persistent and blob keys (the latter needs primary + key loaded: 2 of the 3 slots) used by 4 threads at once,
    with a storage key unsealing in between: every call must serialise on the one context."""
    keys = [
        create_identity_key(f"tpm2:handle=0x81010001?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256, force=False),
        create_identity_key(f"tpm2:blob={tmp_path / 'b.tpm'}?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256, force=False),
    ]
    storage = create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={tpm.tcti}&pcrs=sha256:7", force=False)
    start = threading.Barrier(THREADS)
    results: list[tuple[int, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            start.wait()
            for i in range(SIGNATURES_PER_THREAD):
                which = (n + i) % 2
                data = f"thread {n} message {i}".encode()
                sig = keys[which].sign(data)
                with lock:
                    results.append((which, data, sig))
                if i % 5 == 0:
                    assert storage.unwrap(storage.wrap(data)) == data
        except BaseException as exc:  # collected and re-raised in the main thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(results) == THREADS * SIGNATURES_PER_THREAD
    for which, data, sig in results:
        pub = keys[which].public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
    assert_nothing_loaded(tpm)


def test_no_transient_objects_or_sessions_left_behind(tpm: SwTpm, tmp_path: Path) -> None:
    blob_key = create_identity_key(f"tpm2:blob={tmp_path / 'b.tpm'}?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256,
                                   force=False)
    assert_nothing_loaded(tpm)
    for _ in range(10):  # a leak of one object per call would exhaust the 3 slots long before this ends
        blob_key.sign(b"data")
    blob_key.attributes()
    storage = create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={tpm.tcti}&pcrs=sha256:16", force=False)
    wrapped = storage.wrap(b"k" * 32)
    for _ in range(5):
        storage.unwrap(wrapped)
    assert_nothing_loaded(tpm)
    # failures must clean up too
    subprocess.run(["tpm2_pcrextend", "-T", tpm.tcti, "16:sha256=" + "ab" * 32], check=True, capture_output=True)
    for _ in range(5):
        with pytest.raises(UnsealFailed):
            storage.unwrap(wrapped)
    assert_nothing_loaded(tpm)


def test_reconnects_after_the_tpm_restarts(tpm: SwTpm, tmp_path: Path) -> None:
    uri = f"tpm2:handle=0x81010001?tcti={tpm.tcti}"
    key = create_identity_key(uri, KeyAlgorithm.ECDSA_P256, force=False)
    storage = create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={tpm.tcti}&pcrs=sha256:7", force=False)
    wrapped = storage.wrap(b"k" * 32)
    tpm.stop()
    with pytest.raises(TpmUnreachable) as err:
        key.sign(b"data")
    assert tpm.tcti in str(err.value) and err.value.rc is not None
    with pytest.raises(TpmUnreachable):
        storage.unwrap(wrapped)
    tpm.restart()
    assert storage.unwrap(wrapped) == b"k" * 32  # PCR 7 is back to its boot value after the restart
    sig = key.sign(b"data")  # the persistent key survived the "reboot"; the context reconnected
    pub = key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"data", ec.ECDSA(hashes.SHA256()))


def test_tpm_not_started_is_explained(tmp_path: Path) -> None:
    with SwTpm.start(tmp_path, startup=False) as raw:
        try:
            with pytest.raises(HardwareError, match="TPM2_Startup") as err:
                create_identity_key(f"tpm2:handle=0x81010001?tcti={raw.tcti}", KeyAlgorithm.ECDSA_P256, force=False)
            assert err.value.rc is not None and err.value.rc.startswith("0x100 ")
        finally:
            tpm2_context.close(raw.tcti)


def test_owner_password_is_explained(tpm: SwTpm, tmp_path: Path) -> None:
    subprocess.run(["tpm2_changeauth", "-T", tpm.tcti, "-c", "owner", "owner-secret"], check=True, capture_output=True)
    with pytest.raises(HardwareError, match="empty owner-hierarchy auth") as err:
        create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={tpm.tcti}", force=False)
    assert "owner-secret" not in str(err.value)
    assert not (tmp_path / "s.tpm").exists()
    assert_nothing_loaded(tpm)


def test_swtpm_helper_forgets_the_context_of_a_stopped_tpm(tmp_path: Path) -> None:
    """A later swtpm may reuse the port: it must not inherit the dead connection."""
    with SwTpm.start(tmp_path) as t:
        create_storage_key(f"tpm2:sealed={tmp_path / 's.tpm'}?tcti={t.tcti}", force=False)
        assert t.tcti in tpm2_context.open_tctis()
    assert t.tcti not in tpm2_context.open_tctis()


def test_exported_fixture_yields_a_started_swtpm(swtpm_tcti: str, tmp_path: Path) -> None:
    assert swtpm_tcti.startswith("swtpm:host=127.0.0.1,port=")
    out = subprocess.run(["tpm2_getcap", "-T", swtpm_tcti, "properties-variable"], check=True, capture_output=True,
                         text=True).stdout
    assert "TPM2_PT_STARTUP_CLEAR" in out  # answered at all: TPM2_Startup(CLEAR) already ran
    key = create_identity_key(f"tpm2:blob={tmp_path / 'k.tpm'}?tcti={swtpm_tcti}", KeyAlgorithm.ECDSA_P256,
                              force=False)
    pub = key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(key.sign(b"m"), b"m", ec.ECDSA(hashes.SHA256()))


def test_forked_child_opens_its_own_context(tpm: SwTpm, tmp_path: Path) -> None:
    """A child must not drive the parent's ESAPI context (shared socket or device file, shared session state)."""
    key = create_identity_key(f"tpm2:blob={tmp_path / 'k.tpm'}?tcti={tpm.tcti}", KeyAlgorithm.ECDSA_P256,
                              force=False)
    key.sign(b"parent first")
    parent_ctx = tpm2_context._contexts[tpm.tcti]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running pytest's teardown
        status = 1
        try:
            os.close(read_fd)
            sig = key.sign(b"from the child")
            ctx = tpm2_context._contexts[tpm.tcti]
            own = ctx is not parent_ctx and ctx.pid == os.getpid()
            os.write(write_fd, (b"own:" if own else b"shared:") + sig)
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read()
    _pid, status = os.waitpid(pid, 0)
    assert status == 0
    tag, _, sig = report.partition(b":")
    assert tag == b"own"
    pub = key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"from the child", ec.ECDSA(hashes.SHA256()))
    assert tpm2_context._contexts[tpm.tcti] is parent_ctx  # the parent's context is untouched and still works
    pub.verify(key.sign(b"parent again"), b"parent again", ec.ECDSA(hashes.SHA256()))
