"""PKCS#11 backend (python-pkcs11; tested on SoftHSM2 2.6).

Identity key: Ed25519 (CKM_EDDSA) or ECDSA P-256 (SHA-256 on the host, CKM_ECDSA, raw r||s converted to DER),
generated on the token with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false; both are read back and checked every
time the key is loaded. Storage key: AES-256 on the token; secrets are wrapped with CKM_AES_KEY_WRAP_PAD
(RFC 5649) by importing them as short-lived session objects. Every call runs on the one PKCS#11 worker thread.

A token can go away while the daemon runs (a USB token pulled, the token files of SoftHSM moved, the service
behind a module restarted). An operation that fails the way a vanished token fails re-initialises the module,
logs in again, finds the key again (refusing a different key under the same label) and retries once; while the
token stays away the caller gets `TokenNotFound`/`HardwareError` and tries again later.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hsm import pkcs11_worker
from hsm.api import KeyAlgorithm, KeyAttributes, KeyInfo, PublicKey
from hsm.errors import (
    BadKeyUri,
    HardwareError,
    HsmError,
    KeyExists,
    KeyNotFound,
    KeyPolicyViolation,
    LibraryNotFound,
    PinIncorrect,
    TokenNotFound,
    UnwrapFailed,
    WrongKeyType,
)
from hsm.pkcs11_import import Attribute, KeyType, Mechanism, ObjectClass, p11e, pkcs11
from hsm.uri import Pkcs11Uri

_ED25519_OID = "1.3.101.112"
_P256_OID = "1.2.840.10045.3.1.7"
# CKA_EC_PARAMS of a P-256 key: the DER of ECParameters namedCurve 1.2.840.10045.3.1.7, what
# `pkcs11.util.ec.encode_named_curve_parameters(_P256_OID)` returns (tests/hsm/test_pkcs11.py checks they agree);
# a constant so that loading a key needs no asn1crypto (hsm/pkcs11_import.py).
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")
_DEFAULT_ID = {"identity": b"\x01", "storage": b"\x02"}

_libs: dict[str, Any] = {}
_sessions: dict[tuple[str, str], Any] = {}
_state_lock = threading.Lock()
_uninitialised: set[str] = set()  # modules whose re-initialisation failed (token away): retried on next use
_generation: dict[str, int] = {}  # per module: bumped on each re-initialisation, which invalidates every handle

# What an operation raises when the token, its session or its objects vanished underneath us.
_TOKEN_GONE = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid, p11e.SessionHandleInvalid, p11e.SessionClosed,
               p11e.TokenNotPresent, p11e.TokenNotRecognised, p11e.DeviceRemoved, p11e.DeviceError,
               p11e.GeneralError, p11e.UserNotLoggedIn, p11e.NoSuchKey, p11e.NoSuchToken)


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _reset_module(module_path: str) -> None:
    """Forget the module's sessions and re-initialise it, so a token that came back is seen again. If the token
    is still away, initialisation may fail: the next lookup then fails clearly and resets again."""
    for key in [k for k in _sessions if k[0] == module_path]:
        try:
            _sessions.pop(key).close()
        except Exception:  # noqa: S110 - the session is already dead; closing is a courtesy
            pass
    lib = _libs.get(module_path)
    if lib is not None:
        try:
            lib.reinitialize()
            _uninitialised.discard(module_path)
        except p11e.PKCS11Error:
            _uninitialised.add(module_path)
    _generation[module_path] = _generation.get(module_path, 0) + 1


def _with_recovery(u: Pkcs11Uri, generation: int, reload: Any, op: Any) -> tuple[Any, int]:
    """Run `op(handle)` on the worker thread, reloading the handle first if the module was re-initialised since
    it was loaded, and once more after a re-initialisation if `op` fails as a vanished token does. Returns
    (result, generation of the handle used)."""
    handle = None
    if generation != _generation.get(u.module_path, 0):
        handle, generation = reload(), _generation.get(u.module_path, 0)
    try:
        return op(handle), generation
    except _TOKEN_GONE:
        _reset_module(u.module_path)
        handle = reload()
        return op(handle), _generation.get(u.module_path, 0)


def _rc(exc: BaseException) -> str:
    """python-pkcs11 exception class -> the PKCS#11 return code name (PinIncorrect -> CKR_PIN_INCORRECT)."""
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).upper()


def _translate(exc: BaseException, uri: str, what: str) -> HsmError:
    if isinstance(exc, HsmError):
        return exc
    if isinstance(exc, p11e.PinIncorrect | p11e.PinInvalid | p11e.PinLenRange):
        return PinIncorrect("the token refused the PIN", uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.PinLocked):
        return PinIncorrect("the token's user PIN is locked; reset it with the SO PIN", uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.NoSuchToken | p11e.TokenNotPresent | p11e.TokenNotRecognised | p11e.SlotIDInvalid):
        return TokenNotFound("no such token; check token=/serial= (list tokens with `pkcs11-tool -L`)",
                             uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.NoSuchKey):
        return KeyNotFound(f"{what} not found on the token; create it with `agw keys init`", uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.MechanismInvalid | p11e.DomainParamsInvalid):
        return WrongKeyType(f"the token does not support the mechanism needed for the {what}", uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.WrappedKeyInvalid | p11e.WrappedKeyLenRange | p11e.EncryptedDataInvalid):
        return UnwrapFailed("blob is corrupt or was wrapped by another storage key", uri=uri, rc=_rc(exc))
    if isinstance(exc, p11e.PKCS11Error):
        return HardwareError(f"PKCS#11 error during {what}", uri=uri, rc=_rc(exc))
    return HardwareError(f"unexpected error during {what}: {type(exc).__name__}", uri=uri)


def _load_lib(module_path: str, uri: str) -> Any:
    lib = _libs.get(module_path)
    if lib is None:
        try:
            lib = pkcs11.lib(module_path)
        except (RuntimeError, OSError, p11e.PKCS11Error) as exc:
            raise LibraryNotFound(f"cannot load PKCS#11 module {module_path}: {type(exc).__name__}",
                                  uri=uri) from None
        _libs[module_path] = lib
    if module_path in _uninitialised:
        try:
            lib.initialize()
        except p11e.PKCS11Error as exc:
            raise TokenNotFound("the PKCS#11 module cannot initialise: is the token (or its files) there?",
                                uri=uri, rc=_rc(exc)) from None
        _uninitialised.discard(module_path)
    return lib


def _session(u: Pkcs11Uri) -> Any:
    """The process's logged-in read-write session for the token (opened once, reused)."""
    uri = u.redacted()
    lib = _load_lib(u.module_path, uri)
    try:
        if u.slot_id is not None:
            slots = [s for s in lib.get_slots(token_present=True) if s.slot_id == u.slot_id]
            if not slots:
                raise TokenNotFound(f"no token in slot {u.slot_id}", uri=uri)
            token = slots[0].get_token()
        else:
            kwargs: dict[str, str] = {}
            if u.token is not None:
                kwargs["token_label"] = u.token
            if u.serial is not None:
                kwargs["token_serial"] = u.serial
            token = lib.get_token(**kwargs)
    except HsmError:
        raise
    except Exception as exc:
        raise _translate(exc, uri, "token lookup") from None
    key = (u.module_path, str(token.serial))
    session = _sessions.get(key)
    if session is None:
        pin = u.read_pin()
        try:
            session = token.open(user_pin=pin, rw=True)
        except Exception as exc:
            raise _translate(exc, uri, "login") from None
        finally:
            del pin
        _sessions[key] = session
    return session


def _find(session: Any, u: Pkcs11Uri, object_class: ObjectClass, what: str) -> Any:
    query: dict[str, Any] = {"object_class": object_class}
    if u.object is not None:
        query["label"] = u.object
    if u.id is not None:
        query["id"] = u.id
    try:
        return session.get_key(**query)
    except p11e.MultipleObjectsReturned:
        raise HardwareError(f"several {what}s match; add id= to the URI", uri=u.redacted()) from None
    except Exception as exc:
        raise _translate(exc, u.redacted(), what) from None


def _exists(session: Any, u: Pkcs11Uri, object_class: ObjectClass) -> bool:
    try:
        _find(session, u, object_class, "key")
    except KeyNotFound:
        return False
    return True


def _destroy_all(session: Any, u: Pkcs11Uri) -> None:
    attrs: dict[Attribute, Any] = {}
    if u.object is not None:
        attrs[Attribute.LABEL] = u.object
    if u.id is not None:
        attrs[Attribute.ID] = u.id
    for obj in list(session.get_objects(attrs)):
        obj.destroy()


def _read_attributes(key: Any) -> KeyAttributes:
    return KeyAttributes(sensitive=bool(key[Attribute.SENSITIVE]), extractable=bool(key[Attribute.EXTRACTABLE]),
                         never_extractable=bool(key[Attribute.NEVER_EXTRACTABLE]), local=bool(key[Attribute.LOCAL]))


def _check_protected(attrs: KeyAttributes, uri: str, what: str) -> None:
    if attrs.extractable or not attrs.sensitive:
        raise KeyPolicyViolation(f"refusing to use the {what}: it is extractable or not sensitive "
                                 f"(sensitive={attrs.sensitive}, extractable={attrs.extractable}); "
                                 "re-create it with `agw keys init --force`", uri=uri)


@dataclass(frozen=True)
class _Handles:
    private: Any
    public_key: PublicKey
    algorithm: KeyAlgorithm


class Pkcs11IdentityKey:
    """A handle on a token-held identity key."""

    def __init__(self, u: Pkcs11Uri, handles: _Handles) -> None:
        self._u = u
        self._h = handles
        self._gen = _generation.get(u.module_path, 0)

    @property
    def uri(self) -> str:
        return self._u.redacted()

    @property
    def algorithm(self) -> KeyAlgorithm:
        return self._h.algorithm

    def public_key(self) -> PublicKey:
        return self._h.public_key

    def sign(self, data: bytes) -> bytes:
        if self._h.algorithm is KeyAlgorithm.ED25519:
            return bytes(pkcs11_worker.run(lambda: self._call(lambda key: key.sign(data, mechanism=Mechanism.EDDSA))))
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        h = digest.finalize()
        raw = bytes(pkcs11_worker.run(lambda: self._call(lambda key: key.sign(h, mechanism=Mechanism.ECDSA))))
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def _reload(self) -> Any:
        """Find the key again after the module was re-initialised; it must be the same key, not a namesake."""
        handles = _load_identity(self._u)
        if handles.algorithm is not self._h.algorithm or _spki(handles.public_key) != _spki(self._h.public_key):
            raise KeyPolicyViolation("the token that came back holds a different identity key under this label",
                                     uri=self.uri)
        self._h = handles
        return handles.private

    def _call(self, fn: Any) -> Any:
        try:
            result, self._gen = _with_recovery(self._u, self._gen, self._reload,
                                               lambda key: fn(self._h.private if key is None else key))
            return result
        except Exception as exc:
            raise _translate(exc, self.uri, "signing") from None

    def attributes(self) -> KeyAttributes:
        return pkcs11_worker.run(lambda: _read_attributes(self._h.private))

    def info(self) -> KeyInfo:
        pem = self._h.public_key.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return KeyInfo(role="identity", backend="pkcs11", uri=self.uri, algorithm=self.algorithm.value,
                       attributes=self.attributes(), public_key_pem=pem)


class Pkcs11StorageKey:
    """A handle on a token-held AES-256 key that wraps secrets with CKM_AES_KEY_WRAP_PAD."""

    def __init__(self, u: Pkcs11Uri, key: Any) -> None:
        self._u = u
        self._key = key
        self._gen = _generation.get(u.module_path, 0)

    @property
    def uri(self) -> str:
        return self._u.redacted()

    def wrap(self, key: bytes) -> bytes:
        if not 16 <= len(key) <= 512:
            raise ValueError("can wrap secrets of 16..512 bytes")

        def op(wrapping: Any) -> bytes:
            session = _session(self._u)
            tmp = session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.VALUE: key, Attribute.TOKEN: False, Attribute.EXTRACTABLE: True,
                Attribute.SENSITIVE: False})
            try:
                return bytes(wrapping.wrap_key(tmp, mechanism=Mechanism.AES_KEY_WRAP_PAD))
            finally:
                tmp.destroy()

        return pkcs11_worker.run(lambda: self._guard(op, "wrap"))

    def unwrap(self, blob: bytes) -> bytes:
        if not 24 <= len(blob) <= 520 or len(blob) % 8:
            raise UnwrapFailed("blob has an impossible length for AES key wrap", uri=self.uri)

        def op(wrapping: Any) -> bytes:
            tmp = wrapping.unwrap_key(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, blob,
                                       mechanism=Mechanism.AES_KEY_WRAP_PAD, store=False,
                                       template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False})
            try:
                return bytes(tmp[Attribute.VALUE])
            finally:
                tmp.destroy()

        return pkcs11_worker.run(lambda: self._guard(op, "unwrap"))

    def _reload(self) -> Any:
        self._key = _load_storage(self._u)
        return self._key

    def _guard(self, op: Any, what: str) -> bytes:
        try:
            out, self._gen = _with_recovery(self._u, self._gen, self._reload,
                                            lambda key: op(self._key if key is None else key))
            return bytes(out)
        except HsmError:
            raise
        except p11e.PKCS11Error as exc:
            if what == "unwrap" and not isinstance(exc, p11e.PinIncorrect | p11e.DeviceRemoved):
                raise UnwrapFailed("blob is corrupt or was wrapped by another storage key", uri=self.uri,
                                   rc=_rc(exc)) from None
            raise _translate(exc, self.uri, what) from None

    def attributes(self) -> KeyAttributes:
        return pkcs11_worker.run(lambda: _read_attributes(self._key))

    def info(self) -> KeyInfo:
        return KeyInfo(role="storage", backend="pkcs11", uri=self.uri, algorithm="aes-256",
                       attributes=self.attributes())


def _parse(uri: str, role: str) -> Pkcs11Uri:
    u = Pkcs11Uri.parse(uri)
    if u.object is None:
        raise BadKeyUri(f"the {role} key URI must name the object (object=<label>)", uri=u.redacted())
    return u


def _der_octet_string(der: bytes) -> bytes:
    """The contents of one DER OCTET STRING (CKA_EC_POINT), nothing before or after it; a short decoder instead of
    asn1crypto's (hsm/pkcs11_import.py). Raises ValueError on anything else."""
    if len(der) < 2 or der[0] != 0x04:
        raise ValueError("CKA_EC_POINT is not a DER OCTET STRING")
    n, start = der[1], 2
    if n & 0x80:  # long form: 1-2 length bytes are plenty for an EC point; DER uses the fewest, no leading zero
        width = n & 0x7F
        if width not in (1, 2) or len(der) < 2 + width or der[2] == 0:
            raise ValueError("CKA_EC_POINT has a bad DER length")
        n, start = int.from_bytes(der[2:2 + width], "big"), 2 + width
        if n < 0x80:
            raise ValueError("CKA_EC_POINT has a bad DER length")
    if len(der) != start + n:
        raise ValueError("CKA_EC_POINT's DER length does not match its size")
    return der[start:]


def _public_key_of(pub: Any, algorithm: KeyAlgorithm, uri: str) -> PublicKey:
    try:
        point = _der_octet_string(bytes(pub[Attribute.EC_POINT]))
    except ValueError as exc:  # (the token's public key object is not what PKCS#11 prescribes: say why)
        raise WrongKeyType(f"the identity public key cannot be read: {exc}", uri=uri) from None
    if algorithm is KeyAlgorithm.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _algorithm_of(private: Any, uri: str) -> KeyAlgorithm:
    key_type = private[Attribute.KEY_TYPE]
    if key_type == KeyType.EC_EDWARDS:
        return KeyAlgorithm.ED25519
    if key_type == KeyType.EC:
        params = bytes(private[Attribute.EC_PARAMS])
        if params != _P256_PARAMS:
            raise WrongKeyType("the identity key is an EC key on a curve other than P-256", uri=uri)
        return KeyAlgorithm.ECDSA_P256
    raise WrongKeyType(f"the identity key has key type {key_type!r}; expected EC (P-256) or EC_EDWARDS", uri=uri)


def _load_identity(u: Pkcs11Uri) -> _Handles:
    session = _session(u)
    private = _find(session, u, ObjectClass.PRIVATE_KEY, "identity private key")
    public = _find(session, u, ObjectClass.PUBLIC_KEY, "identity public key")
    try:
        algorithm = _algorithm_of(private, u.redacted())
        attrs = _read_attributes(private)
        _check_protected(attrs, u.redacted(), "identity key")
        return _Handles(private, _public_key_of(public, algorithm, u.redacted()), algorithm)
    except HsmError:
        raise
    except Exception as exc:
        raise _translate(exc, u.redacted(), "identity key load") from None


def load_identity_key(uri: str) -> Pkcs11IdentityKey:
    u = _parse(uri, "identity")
    return Pkcs11IdentityKey(u, pkcs11_worker.run(lambda: _load_identity(u)))


def create_identity_key(uri: str, algorithm: KeyAlgorithm, *, force: bool = False) -> Pkcs11IdentityKey:
    u = _parse(uri, "identity")

    def op() -> _Handles:
        session = _session(u)
        if _exists(session, u, ObjectClass.PRIVATE_KEY):
            if not force:
                raise KeyExists("an identity key already exists; pass --force to replace it", uri=u.redacted())
            _destroy_all(session, u)
        from pkcs11.util.ec import encode_named_curve_parameters  # asn1crypto: only when a key is generated

        oid = _ED25519_OID if algorithm is KeyAlgorithm.ED25519 else _P256_OID
        key_type = KeyType.EC_EDWARDS if algorithm is KeyAlgorithm.ED25519 else KeyType.EC
        try:
            params = session.create_domain_parameters(
                key_type, {Attribute.EC_PARAMS: encode_named_curve_parameters(oid)}, local=True)
            params.generate_keypair(
                store=True, label=u.object, id=u.id or _DEFAULT_ID["identity"],
                public_template={Attribute.VERIFY: True, Attribute.TOKEN: True, Attribute.PRIVATE: False},
                private_template={Attribute.SIGN: True, Attribute.TOKEN: True, Attribute.PRIVATE: True,
                                  Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False})
        except Exception as exc:
            raise _translate(exc, u.redacted(), f"{algorithm.value} key generation") from None
        return _load_identity(u)

    return Pkcs11IdentityKey(u, pkcs11_worker.run(op))


def _load_storage(u: Pkcs11Uri) -> Any:
    session = _session(u)
    key = _find(session, u, ObjectClass.SECRET_KEY, "storage key")
    try:
        if key[Attribute.KEY_TYPE] != KeyType.AES or key[Attribute.VALUE_LEN] != 32:
            raise WrongKeyType("the storage key must be AES-256", uri=u.redacted())
        _check_protected(_read_attributes(key), u.redacted(), "storage key")
    except HsmError:
        raise
    except Exception as exc:
        raise _translate(exc, u.redacted(), "storage key load") from None
    return key


def load_storage_key(uri: str) -> Pkcs11StorageKey:
    u = _parse(uri, "storage")
    return Pkcs11StorageKey(u, pkcs11_worker.run(lambda: _load_storage(u)))


def create_storage_key(uri: str, *, force: bool = False) -> Pkcs11StorageKey:
    u = _parse(uri, "storage")

    def op() -> Any:
        session = _session(u)
        if _exists(session, u, ObjectClass.SECRET_KEY):
            if not force:
                raise KeyExists("a storage key already exists; replacing it would make the store unreadable. "
                                "Rotate with `agw keys rotate-storage` instead, or pass --force", uri=u.redacted())
            _destroy_all(session, u)
        try:
            session.generate_key(KeyType.AES, 256, label=u.object, id=u.id or _DEFAULT_ID["storage"], store=True,
                                 template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                           Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.TOKEN: True,
                                           Attribute.PRIVATE: True, Attribute.ENCRYPT: False,
                                           Attribute.DECRYPT: False})
        except Exception as exc:
            raise _translate(exc, u.redacted(), "AES-256 key generation") from None
        return _load_storage(u)

    return Pkcs11StorageKey(u, pkcs11_worker.run(op))
