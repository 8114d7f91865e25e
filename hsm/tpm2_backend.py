"""TPM 2.0 backend: an ECDSA P-256 identity key and a sealed storage secret, through tpm2-pytss ESAPI.

Identity keys are ordinary (unrestricted) signing keys under the owner-hierarchy storage primary
(`hsm.tpm2_context.primary_template`), created inside the TPM with fixedTPM, fixedParent and sensitiveDataOrigin,
so the private key never exists outside it. A `tpm2:handle=` reference keeps the key at a persistent handle
(TPM2_EvictControl); a `tpm2:blob=` reference keeps the TPM-encrypted private part and the public part in a
"TSS2 PRIVATE KEY" PEM file (the ASN.1 key-file format of tpm2-openssl and tpm2-tss-engine, parent 0x40000001 =
the owner primary from the ECC P-256 storage template; tpm2-pytss's TSSPrivKey loads it the same way, see the
tests), loaded for each operation and flushed afterwards. A TPM has no Ed25519: asking for it is a `WrongKeyType`.

Storage keys (`tpm2:sealed=`) live in `hsm.tpm2_sealed`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_RH, TPMA_OBJECT
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
)

from hsm.api import IdentityKey, KeyAlgorithm, KeyAttributes, KeyInfo, StorageKey
from hsm.errors import BadKeyUri, KeyExists, KeyNotFound, KeyPolicyViolation, WrongKeyType
from hsm.tpm2_context import (
    attributes_from_tpma,
    load_object,
    primary,
    tpm_session,
    transient,
    write_private_file,
)
from hsm.tpm2_sealed import TpmSealedStorageKey
from hsm.tpm2_sealed import create_storage_key as _create_storage_key
from hsm.tpm2_sealed import load_storage_key as _load_storage_key
from hsm.uri import Tpm2Ref

__all__ = ["TpmIdentityKey", "create_identity_key", "create_storage_key", "load_identity_key", "load_storage_key"]

_NON_EXPORTABLE = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
_REQUIRED = _NON_EXPORTABLE | TPMA_OBJECT.SENSITIVEDATAORIGIN


def identity_template() -> Any:
    """ECDSA P-256 / SHA-256 signing key, born in the TPM and bound to it and to its parent."""
    public = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.NODA,
        authPolicy=b"",
        parameters=TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(
                    scheme=TPM2_ALG.ECDSA,
                    details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
                ),
                curveID=TPM2_ECC.NIST_P256,
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            ),
        ),
    )
    return TPM2B_PUBLIC(publicArea=public)


def _ecdsa_sha256() -> Any:
    scheme = TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
    return TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA, details=scheme)


def _identity_ref(uri: str) -> Tpm2Ref:
    ref = Tpm2Ref.parse(uri)
    if ref.handle is None and ref.blob is None:
        raise BadKeyUri("an identity key needs handle= (persistent) or blob= (key file), not sealed=",
                        uri=ref.redacted())
    if ref.pcrs:
        raise BadKeyUri("pcrs= applies to sealed= storage keys only", uri=ref.redacted())
    return ref


def _attrs_of(public: Any) -> int:
    return int(cast(int, public.publicArea.objectAttributes))


def _check_identity_public(public: Any, uri: str) -> ec.EllipticCurvePublicKey:
    """Refuse anything but an unrestricted P-256 signing key created inside, and fixed to, this TPM."""
    area = public.publicArea
    if int(cast(int, area.type)) != int(TPM2_ALG.ECC):
        raise WrongKeyType(f"the TPM object is a {TPM2_ALG(area.type)!s} key, not ECC P-256", uri=uri)
    params = area.parameters.eccDetail
    if int(cast(int, params.curveID)) != int(TPM2_ECC.NIST_P256):
        raise WrongKeyType(f"the TPM key uses curve {TPM2_ECC(params.curveID)!s}, not NIST P-256", uri=uri)
    attrs = _attrs_of(public)
    if not attrs & TPMA_OBJECT.SIGN_ENCRYPT or attrs & (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT):
        raise WrongKeyType(f"the TPM key is not a plain signing key (attributes {TPMA_OBJECT(attrs)!s})", uri=uri)
    scheme = int(cast(int, params.scheme.scheme))
    if scheme not in (int(TPM2_ALG.NULL), int(TPM2_ALG.ECDSA)):
        raise WrongKeyType(f"the TPM key is bound to signature scheme {TPM2_ALG(scheme)!s}, not ECDSA", uri=uri)
    if attrs & _REQUIRED != _REQUIRED:
        raise KeyPolicyViolation("refusing an identity key that is not fixedTPM|fixedParent|sensitiveDataOrigin "
                                 f"(it has {TPMA_OBJECT(attrs)!s})", uri=uri)
    x = int.from_bytes(bytes(area.unique.ecc.x), "big")
    y = int.from_bytes(bytes(area.unique.ecc.y), "big")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError:
        raise WrongKeyType("the TPM key's public point is not on P-256", uri=uri) from None


def _persistent_exists(esys: Any, handle: int) -> bool:
    _more, data = esys.get_capability(TPM2_CAP.HANDLES, handle, 1)
    handles = [int(cast(int, h)) for h in data.data.handles]
    return handle in handles


def _read_blob(ref: Tpm2Ref) -> Any:
    path = cast(Path, ref.blob)
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise KeyNotFound(f"key file {path} does not exist", uri=ref.redacted()) from None
    except OSError as exc:
        raise KeyNotFound(f"cannot read key file {path}: {exc.strerror}", uri=ref.redacted()) from None
    try:
        key = TSSPrivKey.from_pem(pem)
    except Exception:  # the ASN.1 and TSS unmarshal layers raise assorted types
        raise WrongKeyType(f"{path} is not a TSS2 PRIVATE KEY file", uri=ref.redacted()) from None
    if int(cast(int, key.parent)) != int(TPM2_RH.OWNER) or not key.empty_auth:
        raise WrongKeyType(f"{path}: only keys under the owner storage primary with empty auth are supported",
                           uri=ref.redacted())
    return key


class TpmIdentityKey:
    """A handle on a TPM identity key. Holds the public part only; every private operation goes to the TPM."""

    def __init__(self, ref: Tpm2Ref, public: Any, name: bytes, blob: Any | None) -> None:
        self._ref = ref
        self._uri = ref.redacted()
        self._name = name
        self._blob = blob
        self._public_key = _check_identity_public(public, self._uri)

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def algorithm(self) -> KeyAlgorithm:
        return KeyAlgorithm.ECDSA_P256

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @contextlib.contextmanager
    def _loaded(self, esys: Any) -> Iterator[Any]:
        """The key as an ESAPI handle for one operation: the persistent object, or the blob loaded and flushed."""
        if self._blob is None:
            handle = esys.tr_from_tpmpublic(cast(int, self._ref.handle))
            try:
                if bytes(esys.tr_get_name(handle)) != self._name:
                    raise KeyNotFound("the key at the persistent handle was replaced since it was loaded",
                                      uri=self._uri)
                yield handle
            finally:
                with contextlib.suppress(TSS2_Exception):
                    esys.tr_close(handle)
            return
        with primary(esys) as parent:
            handle = _load_blob(esys, parent, self._blob, self._uri)
        with transient(esys, handle):
            yield handle

    def sign(self, data: bytes) -> bytes:
        """SHA-256 on the host, ECDSA in the TPM, DER (SEQUENCE of r, s) out."""
        digest = hashlib.sha256(data).digest()
        with tpm_session(self._ref, "sign with the identity key") as esys, self._loaded(esys) as key:
            sig = esys.sign(key, TPM2B_DIGEST(digest), _ecdsa_sha256(), None)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)

    def attributes(self) -> KeyAttributes:
        """Read the object attributes back from the TPM (not from our copy of the public area)."""
        with tpm_session(self._ref, "read the identity key's attributes") as esys, self._loaded(esys) as key:
            public, _name, _qname = esys.read_public(key)
        return attributes_from_tpma(_attrs_of(public))

    def info(self) -> KeyInfo:
        pem = self._public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return KeyInfo(role="identity", backend="tpm2", uri=self._uri, algorithm=KeyAlgorithm.ECDSA_P256.value,
                       attributes=self.attributes(), public_key_pem=pem.decode("ascii"))

    def __repr__(self) -> str:
        return f"TpmIdentityKey({self._uri!r})"


def _load_blob(esys: Any, parent: Any, blob: Any, uri: str) -> Any:
    return load_object(esys, parent, blob.private, blob.public, uri=uri, what="key file")


def _create_persistent(esys: Any, handle: int, *, force: bool, uri: str) -> None:
    """Create the key and make it persistent at `handle`; the old key there goes only once the new one exists."""
    exists = _persistent_exists(esys, handle)
    if exists and not force:
        raise KeyExists(f"persistent handle {handle:#x} is already in use; pass force to replace it", uri=uri)
    with primary(esys) as parent:
        private, public, _cdata, _chash, _ticket = esys.create(parent, None, identity_template())
        loaded = esys.load(parent, private, public)
    with transient(esys, loaded):
        if exists:
            old = esys.tr_from_tpmpublic(handle)
            esys.evict_control(ESYS_TR.OWNER, old, handle)  # removes the old persistent object
            esys.tr_close(old)  # ESAPI keeps the evicted object's metadata (and name) until closed
        esys.tr_close(esys.evict_control(ESYS_TR.OWNER, loaded, handle))


def create_identity_key(uri: str, algorithm: KeyAlgorithm, *, force: bool = False) -> TpmIdentityKey:
    """Generate an identity key inside the TPM. Refuses to replace an existing key unless `force`."""
    ref = _identity_ref(uri)
    safe = ref.redacted()
    if KeyAlgorithm(algorithm) is not KeyAlgorithm.ECDSA_P256:
        raise WrongKeyType(f"a TPM has no Ed25519 (asked for {algorithm.value}): TPM 2.0 signs with ECDSA P-256, "
                           f"configure algorithm {KeyAlgorithm.ECDSA_P256.value} for a tpm2: identity key", uri=safe)
    if ref.blob is not None and ref.blob.exists() and not force:
        raise KeyExists(f"key file {ref.blob} already exists; pass force to replace it", uri=safe)
    with tpm_session(ref, "create the identity key") as esys:
        if ref.handle is not None:
            _create_persistent(esys, ref.handle, force=force, uri=safe)
        else:
            with primary(esys) as parent:
                private, public, _cdata, _chash, _ticket = esys.create(parent, None, identity_template())
    if ref.blob is not None:
        pem = TSSPrivKey(private, public, empty_auth=True, parent=int(TPM2_RH.OWNER)).to_pem()
        write_private_file(ref.blob, bytes(pem), safe)
    return load_identity_key(uri)


def load_identity_key(uri: str) -> TpmIdentityKey:
    """Open an existing identity key and check it is a non-exportable P-256 signing key."""
    ref = _identity_ref(uri)
    safe = ref.redacted()
    blob = _read_blob(ref) if ref.blob is not None else None
    with tpm_session(ref, "load the identity key") as esys:
        if blob is None:
            if not _persistent_exists(esys, cast(int, ref.handle)):
                raise KeyNotFound(f"no key at persistent handle {ref.handle:#x}", uri=safe)
            handle = esys.tr_from_tpmpublic(cast(int, ref.handle))
            try:
                public, name, _qname = esys.read_public(handle)
            finally:
                esys.tr_close(handle)
        else:
            with primary(esys) as parent:
                handle = _load_blob(esys, parent, blob, safe)
            with transient(esys, handle):
                public, name, _qname = esys.read_public(handle)
    return TpmIdentityKey(ref, public, bytes(name), blob)


def create_storage_key(uri: str, *, force: bool = False) -> TpmSealedStorageKey:
    """Seal a fresh 32-byte secret in the TPM (optionally under a PCR policy); see `hsm.tpm2_sealed`."""
    return _create_storage_key(uri, force=force)


def load_storage_key(uri: str) -> TpmSealedStorageKey:
    return _load_storage_key(uri)


if TYPE_CHECKING:  # mypy proves both handles satisfy the API protocols

    def _is_identity_key(key: TpmIdentityKey) -> IdentityKey:
        return key

    def _is_storage_key(key: TpmSealedStorageKey) -> StorageKey:
        return key
