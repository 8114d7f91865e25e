"""TPM 2.0 storage key: a 32-byte secret sealed in the TPM, optionally bound to PCR values.

The secret comes from TPM2_GetRandom and is sealed as a keyedhash data object under the owner storage primary
(fixedTPM, fixedParent: the sealed blob is useless on any other TPM). With `pcrs=sha256:7,16` the object has no
userWithAuth and its authPolicy is TPM2_PolicyPCR over the PCR values at sealing time, so the TPM unseals it only
while those PCRs still hold those values (boot chain unchanged). Both the secret going in (TPM2_Create) and coming
out (TPM2_GetRandom, TPM2_Unseal) are encrypted on the wire by a session salted with the primary, so a bus or
socket sniffer does not see it (tested with the pcap TCTI).

`wrap`/`unwrap` unseal the secret on every call (it is never cached in this process) and use it as the AES-256
key of RFC 5649 key wrap with padding, the same wrapping the PKCS#11 backend does with CKM_AES_KEY_WRAP_PAD.

Blob file: one JSON header line (format, PCR bank and indices, the PCR values at sealing time, which are public
and let an unseal failure name the PCRs that changed), then the marshalled TPM2B_PUBLIC and TPM2B_PRIVATE.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_SE, TPMA_OBJECT, TPMA_SESSION
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_KEYEDHASH_PARMS,
    TPMS_SENSITIVE_CREATE,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from hsm.api import KeyAttributes, KeyInfo
from hsm.errors import BadKeyUri, KeyExists, KeyNotFound, UnsealFailed, UnwrapFailed, WrongKeyType
from hsm.tpm2_context import (
    attributes_from_tpma,
    classify,
    flush,
    is_transport_error,
    load_object,
    primary,
    rc_error,
    rc_text,
    tpm_session,
    transient,
    write_private_file,
)
from hsm.uri import Tpm2Ref

__all__ = ["TpmSealedStorageKey", "create_storage_key", "load_storage_key"]

SECRET_SIZE = 32
_FORMAT = "agw-tpm2-sealed"
_VERSION = 1
_ALGORITHM = "aes-256-kwp"


def _pcr_spec(bank: str, pcrs: tuple[int, ...]) -> str:
    return f"{bank}:" + ",".join(map(str, pcrs))


def _aes128_cfb() -> Any:
    bits, mode = TPMU_SYM_KEY_BITS(aes=128), TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
    return TPMT_SYM_DEF(algorithm=TPM2_ALG.AES, keyBits=bits, mode=mode)


def _sealed_template(policy: bytes) -> Any:
    """A data object: no sign/decrypt, fixed to this TPM; with a policy, usable only through that policy."""
    attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
    if not policy:
        attrs |= TPMA_OBJECT.USERWITHAUTH
    public = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attrs,
        authPolicy=policy,
        parameters=TPMU_PUBLIC_PARMS(
            keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL))
        ),
    )
    return TPM2B_PUBLIC(publicArea=public)


@contextlib.contextmanager
def _salted_session(esys: Any, parent: Any, kind: Any, attrs: int) -> Iterator[Any]:
    """A session salted with the primary, with parameter encryption (DECRYPT: of inputs, ENCRYPT: of outputs)."""
    session = esys.start_auth_session(parent, ESYS_TR.NONE, kind, _aes128_cfb(), TPM2_ALG.SHA256)
    with transient(esys, session):
        esys.trsess_set_attributes(session, attrs | TPMA_SESSION.CONTINUESESSION)
        yield session


def _random(esys: Any, size: int, session: Any) -> bytes:
    """TPM2_GetRandom, its response encrypted by `session` (else the new secret would cross the bus in clear)."""
    out = b""
    while len(out) < size:
        out += bytes(esys.get_random(size - len(out), session1=session))
    return out


def _read_pcrs(esys: Any, bank: str, pcrs: tuple[int, ...], uri: str) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    for index in pcrs:
        _counter, _sel, digests = esys.pcr_read(TPML_PCR_SELECTION.parse(f"{bank}:{index}"))
        if len(digests) != 1:
            raise WrongKeyType(f"the TPM has no active {bank} PCR bank for PCR {index}", uri=uri)
        values[index] = bytes(digests[0])
    return values


def _pcr_policy(esys: Any, bank: str, pcrs: tuple[int, ...]) -> bytes:
    """The PolicyPCR digest over the PCRs' current values, computed by the TPM in a trial session."""
    trial = esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256)
    with transient(esys, trial):
        esys.policy_pcr(trial, None, TPML_PCR_SELECTION.parse(_pcr_spec(bank, pcrs)))
        return bytes(esys.policy_get_digest(trial))


def _header(bank: str, pcrs: tuple[int, ...], values: dict[int, bytes]) -> bytes:
    head = {"format": _FORMAT, "version": _VERSION, "pcrs": _pcr_spec(bank, pcrs) if pcrs else "",
            "pcr_values": {str(i): values[i].hex() for i in pcrs}}
    return json.dumps(head, sort_keys=True).encode("ascii") + b"\n"


class _Blob:
    """A parsed sealed-blob file."""

    def __init__(self, bank: str, pcrs: tuple[int, ...], values: dict[int, bytes], public: Any, private: Any) -> None:
        self.bank = bank
        self.pcrs = pcrs
        self.values = values
        self.public = public
        self.private = private

    def serialize(self) -> bytes:
        return _header(self.bank, self.pcrs, self.values) + bytes(self.public.marshal()) + bytes(self.private.marshal())

    @classmethod
    def parse(cls, data: bytes, path: Path, uri: str) -> _Blob:
        line, nl, body = data.partition(b"\n")
        try:
            head = json.loads(line)
            if not nl or head.get("format") != _FORMAT:
                raise ValueError("format")
            if head.get("version") != _VERSION:
                raise WrongKeyType(f"{path}: sealed blob version {head.get('version')} is not supported", uri=uri)
            bank = "sha256"
            pcrs: tuple[int, ...] = ()
            if head["pcrs"]:
                ref = Tpm2Ref.parse(f"tpm2:sealed=x?pcrs={head['pcrs']}")
                bank, pcrs = ref.pcr_bank, ref.pcrs
            values = {int(k): bytes.fromhex(v) for k, v in head["pcr_values"].items()}
            public, used = TPM2B_PUBLIC.unmarshal(body)
            private, used2 = TPM2B_PRIVATE.unmarshal(body[int(used):])
            if int(used) + int(used2) != len(body):
                raise ValueError("trailing bytes")
        except (ValueError, KeyError, TypeError, AttributeError, BadKeyUri, TSS2_Exception):
            raise WrongKeyType(f"{path} is not an {_FORMAT} blob", uri=uri) from None
        if int(cast(int, public.publicArea.type)) != int(TPM2_ALG.KEYEDHASH):
            raise WrongKeyType(f"{path} does not hold a sealed data object", uri=uri)
        return cls(bank, pcrs, values, public, private)


def _storage_ref(uri: str) -> Tpm2Ref:
    ref = Tpm2Ref.parse(uri)
    if ref.sealed is None:
        raise BadKeyUri("a TPM storage key needs sealed=PATH", uri=ref.redacted())
    return ref


class TpmSealedStorageKey:
    """A handle on a sealed storage secret. Holds only the sealed (TPM-encrypted) blob, never the secret."""

    def __init__(self, ref: Tpm2Ref, blob: _Blob) -> None:
        self._ref = ref
        self._blob = blob
        self._uri = ref.redacted()

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def pcrs(self) -> str:
        return _pcr_spec(self._blob.bank, self._blob.pcrs) if self._blob.pcrs else ""

    def _unseal(self) -> bytes:
        blob = self._blob
        kind = TPM2_SE.POLICY if blob.pcrs else TPM2_SE.HMAC
        with tpm_session(self._ref, "unseal the storage secret") as esys, contextlib.ExitStack() as scope:
            with primary(esys) as parent:
                # Salted with the primary, so the secret travels encrypted; the primary can go once both exist.
                session = scope.enter_context(_salted_session(esys, parent, kind, TPMA_SESSION.ENCRYPT))
                obj = scope.enter_context(transient(esys, _load(esys, parent, blob, self._uri)))
            if blob.pcrs:
                esys.policy_pcr(session, None, TPML_PCR_SELECTION.parse(self.pcrs))
            try:
                secret = bytes(esys.unseal(obj, session1=session))
            except TSS2_Exception as exc:
                if is_transport_error(exc):
                    raise  # tpm_session reports it as TpmUnreachable and reconnects next time
                if blob.pcrs and rc_error(exc) in (int(TPM2_RC.POLICY_FAIL), int(TPM2_RC.PCR_CHANGED)):
                    raise self._pcr_mismatch(esys, exc) from None
                raise classify(exc, "unseal the storage secret", self._uri) from None
        if len(secret) != SECRET_SIZE:
            raise UnsealFailed(f"the sealed secret has {len(secret)} bytes, expected {SECRET_SIZE}", uri=self._uri)
        return secret

    def _pcr_mismatch(self, esys: Any, exc: TSS2_Exception) -> UnsealFailed:
        """Name the PCRs whose values moved since sealing (all of them if we cannot tell)."""
        blob = self._blob
        try:
            now = _read_pcrs(esys, blob.bank, blob.pcrs, self._uri)
            changed = [i for i in blob.pcrs if blob.values.get(i) != now[i]] or list(blob.pcrs)
        except (TSS2_Exception, WrongKeyType):
            changed = list(blob.pcrs)
        which = _pcr_spec(blob.bank, tuple(changed))
        return UnsealFailed(f"the TPM refused to unseal the storage secret: PCR {which} changed since it was sealed "
                            f"to {self.pcrs} (boot chain or measured state differs); re-seal with force after "
                            "checking why", uri=self._uri, rc=rc_text(exc))

    def wrap(self, key: bytes) -> bytes:
        """AES-256 key wrap with padding (RFC 5649) under the unsealed secret."""
        if not key:
            raise ValueError("the key to wrap is empty")
        return aes_key_wrap_with_padding(self._unseal(), key)

    def unwrap(self, blob: bytes) -> bytes:
        kek = self._unseal()
        try:
            return aes_key_unwrap_with_padding(kek, blob)
        except (InvalidUnwrap, ValueError):
            raise UnwrapFailed("the wrapped key is corrupt or was wrapped by another storage key",
                               uri=self._uri) from None

    def attributes(self) -> KeyAttributes:
        """Attributes of the sealed object as the TPM reports them after loading it."""
        with tpm_session(self._ref, "read the storage key's attributes") as esys:
            with primary(esys) as parent:
                obj = _load(esys, parent, self._blob, self._uri)
            with transient(esys, obj):
                public, _name, _qname = esys.read_public(obj)
        return attributes_from_tpma(int(cast(int, public.publicArea.objectAttributes)))

    def info(self) -> KeyInfo:
        return KeyInfo(role="storage", backend="tpm2", uri=self._uri, algorithm=_ALGORITHM,
                       attributes=self.attributes())

    def __repr__(self) -> str:
        return f"TpmSealedStorageKey({self._uri!r})"


def _load(esys: Any, parent: Any, blob: _Blob, uri: str) -> Any:
    return load_object(esys, parent, blob.private, blob.public, uri=uri, what="sealed blob")


def _read_blob(ref: Tpm2Ref) -> _Blob:
    path = cast(Path, ref.sealed)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyNotFound(f"sealed blob {path} does not exist", uri=ref.redacted()) from None
    except OSError as exc:
        raise KeyNotFound(f"cannot read sealed blob {path}: {exc.strerror}", uri=ref.redacted()) from None
    blob = _Blob.parse(data, path, ref.redacted())
    if ref.pcrs and (ref.pcrs, ref.pcr_bank) != (blob.pcrs, blob.bank):
        raise BadKeyUri(f"the URI asks for PCRs {_pcr_spec(ref.pcr_bank, ref.pcrs)} but {path} is sealed to "
                        f"{_pcr_spec(blob.bank, blob.pcrs) if blob.pcrs else 'no PCRs'}", uri=ref.redacted())
    return blob


def create_storage_key(uri: str, *, force: bool = False) -> TpmSealedStorageKey:
    """Seal a fresh secret from the TPM's RNG; bind it to the current values of `pcrs=` if given."""
    ref = _storage_ref(uri)
    safe = ref.redacted()
    path = cast(Path, ref.sealed)
    if path.exists() and not force:
        raise KeyExists(f"sealed blob {path} already exists; pass force to replace it", uri=safe)
    with tpm_session(ref, "seal the storage secret") as esys:
        values = _read_pcrs(esys, ref.pcr_bank, ref.pcrs, safe) if ref.pcrs else {}
        policy = _pcr_policy(esys, ref.pcr_bank, ref.pcrs) if ref.pcrs else b""
        crypt = TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT
        with primary(esys) as parent, _salted_session(esys, parent, TPM2_SE.HMAC, crypt) as enc:
            secret = _random(esys, SECRET_SIZE, enc)
            sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=secret))
            private, public, _cdata, _chash, _ticket = esys.create(
                parent, sensitive, _sealed_template(policy), session1=ESYS_TR.PASSWORD, session2=enc)
    del secret, sensitive
    blob = _Blob(ref.pcr_bank, ref.pcrs, values, public, private)
    write_private_file(path, blob.serialize(), safe)
    return load_storage_key(uri)


def load_storage_key(uri: str) -> TpmSealedStorageKey:
    """Open a sealed storage key, checking the blob loads under this TPM's primary (it is not unsealed here)."""
    ref = _storage_ref(uri)
    blob = _read_blob(ref)
    with tpm_session(ref, "load the sealed blob") as esys:
        with primary(esys) as parent:
            obj = _load(esys, parent, blob, ref.redacted())
        flush(esys, obj)
    if not ref.pcrs and blob.pcrs:
        ref = Tpm2Ref(sealed=ref.sealed, tcti=ref.tcti, pcrs=blob.pcrs, pcr_bank=blob.bank)
    return TpmSealedStorageKey(ref, blob)
