"""One ESAPI context per TCTI per process, behind a lock, and the TSS return codes turned into our errors.

A TPM is a single, slow, stateful device: every call from this process goes through one `ESAPI` object per TCTI
and one lock, so threads never interleave commands or sessions. The owner-hierarchy primary (the parent of our
keys) is recreated on demand from a fixed template: primaries are deterministic, so the same template gives the
same key after a reboot, and we never spend a persistent handle or hold a slot on it. Transient objects are flushed
as soon as an operation ends (swtpm, like many real TPMs, has only 3 object slots).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_ECC, TPM2_RC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from hsm.api import KeyAttributes
from hsm.errors import HardwareError, HsmError, KeyNotFound, TpmUnreachable, UnsealFailed
from hsm.uri import Tpm2Ref

_FIXED = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT

# TSS2_RC layer (bits 16..23) of errors raised by the TCTI, i.e. the transport: socket or device trouble.
_TCTI_LAYER = 0x0A0000
_LAYER_MASK = 0xFF0000


def primary_template() -> Any:
    """The owner storage primary: ECC P-256, AES-128-CFB, noDA (tpm2-pytss's TSSPrivKey parent template).

    Keeping to that template means other TSS2 PEM key-file readers that derive parent 0x40000001 from it load our
    key files too.
    """
    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.NODA
        | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(
                    algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
                ),
                scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )
    return TPM2B_PUBLIC(publicArea=public)


def rc_text(exc: TSS2_Exception) -> str:
    """`0x18b (tpm:handle(1):the handle is not correct for the use)`: the number an operator can look up."""
    return f"{int(cast(int, exc.rc)):#x} ({exc})"


def rc_error(exc: TSS2_Exception) -> int:
    """The TPM error code with the handle/parameter/session number stripped (e.g. TPM2_RC.HANDLE)."""
    return int(cast(int, exc.error))


def is_transport_error(exc: TSS2_Exception) -> bool:
    return (int(cast(int, exc.rc)) & _LAYER_MASK) == _TCTI_LAYER


@dataclass
class TpmContext:
    """The process's connection to one TPM. Use only while holding `lock` (see `tpm_session`)."""

    tcti: str
    esys: Any
    pid: int
    lock: threading.RLock

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.esys.close()


_contexts: dict[str, TpmContext] = {}
_contexts_lock = threading.Lock()


def _open(tcti: str, uri: str) -> TpmContext:
    try:
        esys = ESAPI(tcti)
    except TSS2_Exception as exc:
        raise TpmUnreachable(f"cannot open the TPM through TCTI {tcti!r}", uri=uri, rc=rc_text(exc)) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        # TCTILdr.parse raises these for a malformed TCTI string before any TSS call.
        raise TpmUnreachable(f"cannot open the TPM through TCTI {tcti!r}: {exc}", uri=uri) from None
    return TpmContext(tcti=tcti, esys=esys, pid=os.getpid(), lock=threading.RLock())


def _context(tcti: str, uri: str) -> TpmContext:
    with _contexts_lock:
        ctx = _contexts.get(tcti)
        if ctx is not None and ctx.pid != os.getpid():
            # Forked child: the parent's socket or device file is shared; never reuse it.
            del _contexts[tcti]
            ctx = None
        if ctx is None:
            ctx = _open(tcti, uri)
            _contexts[tcti] = ctx
        return ctx


def _drop(ctx: TpmContext) -> None:
    with _contexts_lock:
        if _contexts.get(ctx.tcti) is ctx:
            del _contexts[ctx.tcti]
    ctx.close()


def close(tcti: str) -> None:
    """Close this process's context for one TCTI, if open (e.g. before the simulator behind it stops)."""
    with _contexts_lock:
        ctx = _contexts.pop(tcti, None)
    if ctx is not None:
        with ctx.lock:
            ctx.close()


def open_tctis() -> list[str]:
    """The TCTIs this process holds a context for."""
    with _contexts_lock:
        return sorted(_contexts)


def close_all() -> None:
    """Close every ESAPI context of this process (tests, and shutdown)."""
    with _contexts_lock:
        contexts = list(_contexts.values())
        _contexts.clear()
    for ctx in contexts:
        with ctx.lock:
            ctx.close()


@contextlib.contextmanager
def tpm_session(ref: Tpm2Ref, action: str) -> Iterator[Any]:
    """Hold the TPM lock for one operation and yield the ESAPI context.

    A TSS error that escapes the body becomes one of our errors naming `action`, the URI and the return code.
    A transport error also drops the context, so the next call reconnects (e.g. after the resource manager or
    the simulator restarted).
    """
    uri = ref.redacted()
    ctx = _context(ref.tcti, uri)
    with ctx.lock:
        try:
            yield ctx.esys
        except TSS2_Exception as exc:
            if is_transport_error(exc):
                _drop(ctx)
                raise TpmUnreachable(f"lost the TPM on TCTI {ref.tcti!r} while trying to {action}", uri=uri,
                                     rc=rc_text(exc)) from None
            raise classify(exc, action, uri) from None


_HINTS = {
    int(TPM2_RC.BAD_AUTH): "the TPM refused the authorization: this backend needs an empty owner-hierarchy auth",
    int(TPM2_RC.AUTH_FAIL): "the TPM refused the authorization: this backend needs an empty owner-hierarchy auth",
    int(TPM2_RC.LOCKOUT): "the TPM is in dictionary-attack lockout: wait for recovery or reset it "
                          "(tpm2_dictionarylockout --clear-lockout)",
    int(TPM2_RC.INITIALIZE): "the TPM has not been started (no TPM2_Startup yet: firmware or `tpm2_startup -c` "
                             "on a simulator)",
    int(TPM2_RC.OBJECT_MEMORY): "the TPM has no free object slot: another client holds them (use the kernel "
                                "resource manager, device:/dev/tpmrm0)",
    int(TPM2_RC.SESSION_MEMORY): "the TPM has no free session slot: another client holds them (use the kernel "
                                 "resource manager, device:/dev/tpmrm0)",
    int(TPM2_RC.NV_SPACE): "the TPM has no room for another persistent object",
    int(TPM2_RC.HIERARCHY): "the owner hierarchy is disabled",
}


def classify(exc: TSS2_Exception, action: str, uri: str) -> HsmError:
    """Map a TSS return code to the most useful of our errors."""
    code = rc_error(exc)
    if code in _HINTS:
        return HardwareError(f"the TPM failed to {action}: {_HINTS[code]}", uri=uri, rc=rc_text(exc))
    if code == int(TPM2_RC.HANDLE):
        return KeyNotFound(f"the TPM has no object at the referenced handle (while trying to {action})", uri=uri,
                           rc=rc_text(exc))
    if code in (int(TPM2_RC.POLICY_FAIL), int(TPM2_RC.PCR_CHANGED)):
        return UnsealFailed(f"the TPM policy was not satisfied (while trying to {action})", uri=uri, rc=rc_text(exc))
    return HardwareError(f"the TPM failed to {action}", uri=uri, rc=rc_text(exc))


def load_object(esys: Any, parent: Any, private: Any, public: Any, *, uri: str, what: str) -> Any:
    """Load a saved object under the owner storage primary; a blob from another TPM (or a cleared owner
    hierarchy) is `KeyNotFound`, a lost connection is left to `tpm_session`."""
    try:
        return esys.load(parent, private, public)
    except TSS2_Exception as exc:
        if is_transport_error(exc):
            raise  # tpm_session reports it as TpmUnreachable and reconnects next time
        if rc_error(exc) in (int(TPM2_RC.INTEGRITY), int(TPM2_RC.BINDING), int(TPM2_RC.SIZE)):
            raise KeyNotFound(f"the {what} was not made by this TPM's owner storage primary (owner hierarchy "
                              "cleared, or another TPM)", uri=uri, rc=rc_text(exc)) from None
        raise classify(exc, f"load the {what}", uri) from None


def flush(esys: Any, handle: Any) -> None:
    """Flush a transient object or session; never let a cleanup failure hide the real error."""
    with contextlib.suppress(TSS2_Exception):
        esys.flush_context(handle)


@contextlib.contextmanager
def transient(esys: Any, handle: Any) -> Iterator[Any]:
    """Scope a transient object (or session) handle: flushed on exit, whatever happened."""
    try:
        yield handle
    finally:
        flush(esys, handle)


@contextlib.contextmanager
def primary(esys: Any) -> Iterator[Any]:
    """Create the storage primary for the duration of one operation."""
    handle = esys.create_primary(None, primary_template(), ESYS_TR.OWNER)[0]
    with transient(esys, handle):
        yield handle


def attributes_from_tpma(attrs: int) -> KeyAttributes:
    """KeyAttributes from TPMA_OBJECT bits. Object attributes never change, so never_extractable == !extractable."""
    fixed = attrs & _FIXED == _FIXED
    origin = bool(attrs & TPMA_OBJECT.SENSITIVEDATAORIGIN)
    return KeyAttributes(sensitive=fixed and origin, extractable=not fixed, never_extractable=fixed, local=origin)


def write_private_file(path: Path, data: bytes, uri: str) -> None:
    """Write a key file atomically, readable by its owner only (a missing directory is made owner-only too)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HsmError(f"cannot write key file {path}: {exc.strerror}", uri=uri) from None


