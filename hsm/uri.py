"""Key references: RFC 7512 `pkcs11:` URIs and our `tpm2:` references.

pkcs11:token=agw;object=agw-identity;id=%01?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin
    path attributes (`;`-separated): token, serial, slot-id, object, id (percent-encoded bytes), type.
    query attributes (`&`-separated): module-path, pin-source, pin-value (accepted, discouraged).
    pin-source is `file:PATH`, a plain PATH, `env:VARIABLE` or `cred:NAME` (a systemd credential, read from
    $CREDENTIALS_DIRECTORY/NAME).

tpm2:handle=0x81010001?tcti=swtpm:host=127.0.0.1,port=2321
tpm2:blob=/var/lib/agw/identity.tpm?tcti=device:/dev/tpmrm0
tpm2:sealed=/var/lib/agw/storage.tpm?pcrs=sha256:7,16
    exactly one of handle / blob / sealed; tcti defaults to $TPM2TOOLS_TCTI, then `device:/dev/tpmrm0`.

`redacted()` is the only form that may appear in a log or an error: it drops pin-value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from hsm.errors import BadKeyUri, PinUnavailable

_PKCS11_PATH_ATTRS = frozenset({"token", "serial", "slot-id", "object", "id", "type", "manufacturer", "model",
                                "library-manufacturer", "library-description", "library-version", "slot-description",
                                "slot-manufacturer"})
_PKCS11_QUERY_ATTRS = frozenset({"module-path", "module-name", "pin-source", "pin-value"})
DEFAULT_PKCS11_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TCTI = "device:/dev/tpmrm0"


def _split_attrs(text: str, sep: str, uri: str, allowed: frozenset[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not text:
        return out
    for part in text.split(sep):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise BadKeyUri(f"attribute {name!r} has no value", uri=uri)
        if name not in allowed:
            raise BadKeyUri(f"unknown attribute {name!r}; expected one of {', '.join(sorted(allowed))}", uri=uri)
        if name in out:
            raise BadKeyUri(f"attribute {name!r} given twice", uri=uri)
        out[name] = unquote_to_bytes(value)
    return out


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. Holds at most a pin *source*; the PIN itself is read on demand."""

    token: str | None = None
    serial: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    module_path: str = DEFAULT_PKCS11_MODULE
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith("pkcs11:"):
            raise BadKeyUri("a PKCS#11 URI must start with 'pkcs11:'", uri=_redact_text(text))
        safe = _redact_text(text)
        body = text[len("pkcs11:"):]
        path, _, query = body.partition("?")
        p = _split_attrs(path, ";", safe, _PKCS11_PATH_ATTRS)
        q = _split_attrs(query, "&", safe, _PKCS11_QUERY_ATTRS)
        try:
            slot = int(p["slot-id"].decode()) if "slot-id" in p else None
        except ValueError:
            raise BadKeyUri("slot-id must be a decimal number", uri=safe) from None
        if "type" in p and p["type"] not in (b"private", b"public", b"secret-key", b"cert"):
            raise BadKeyUri("type must be private, public, secret-key or cert", uri=safe)
        module = q.get("module-path", DEFAULT_PKCS11_MODULE.encode()).decode()
        if "module-name" in q and "module-path" not in q:
            module = f"/usr/lib/softhsm/lib{q['module-name'].decode()}.so"
        uri = cls(
            token=p["token"].decode() if "token" in p else None,
            serial=p["serial"].decode() if "serial" in p else None,
            slot_id=slot,
            object=p["object"].decode() if "object" in p else None,
            id=p.get("id"),
            module_path=module,
            pin_source=q["pin-source"].decode() if "pin-source" in q else None,
            pin_value=q["pin-value"].decode() if "pin-value" in q else None,
        )
        if uri.token is None and uri.serial is None and uri.slot_id is None:
            raise BadKeyUri("the URI must name a token (token=, serial= or slot-id=)", uri=safe)
        if uri.object is None and uri.id is None:
            raise BadKeyUri("the URI must name a key (object= or id=)", uri=safe)
        return uri

    def redacted(self) -> str:
        path = []
        if self.token is not None:
            path.append(f"token={quote(self.token, safe='')}")
        if self.serial is not None:
            path.append(f"serial={quote(self.serial, safe='')}")
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        if self.object is not None:
            path.append(f"object={quote(self.object, safe='')}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        query = [f"module-path={self.module_path}"]
        if self.pin_source is not None:
            query.append(f"pin-source={self.pin_source}")
        return "pkcs11:" + ";".join(path) + "?" + "&".join(query)

    def with_object(self, label: str, key_id: bytes | None = None) -> Pkcs11Uri:
        """The same token and PIN source, another key."""
        return Pkcs11Uri(self.token, self.serial, self.slot_id, label, key_id, self.module_path,
                         self.pin_source, self.pin_value)

    def read_pin(self) -> str:
        """Read the user PIN from its source. Errors name the source, never the PIN."""
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_source is None:
            raise PinUnavailable("the URI has no pin-source (file:PATH, env:VAR or cred:NAME)", uri=self.redacted())
        return read_pin_source(self.pin_source, uri=self.redacted())


def read_pin_source(source: str, *, uri: str | None = None) -> str:
    if source.startswith("env:"):
        var = source[4:]
        value = os.environ.get(var)
        if value is None:
            raise PinUnavailable(f"environment variable {var} is not set", uri=uri)
        return value
    if source.startswith("cred:"):
        cdir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cdir:
            raise PinUnavailable("pin-source cred: needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)", uri=uri)
        path = Path(cdir) / source[5:]
    else:
        path = Path(source[5:] if source.startswith("file:") else source)
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise PinUnavailable(f"cannot read PIN file {path}: {exc.strerror}", uri=uri) from None


def _redact_text(text: str) -> str:
    """Remove pin-value from a URI we could not parse, before it goes into an error message."""
    head, sep, query = text.partition("?")
    if not sep:
        return head
    kept = [a for a in query.split("&") if not a.startswith("pin-value")]
    return head + ("?" + "&".join(kept) if kept else "")


@dataclass(frozen=True)
class Tpm2Ref:
    """A parsed `tpm2:` reference to a persistent handle, a saved key blob, or a sealed secret."""

    handle: int | None = None
    blob: Path | None = None
    sealed: Path | None = None
    tcti: str = DEFAULT_TCTI
    pcrs: tuple[int, ...] = ()
    pcr_bank: str = "sha256"

    @classmethod
    def parse(cls, text: str) -> Tpm2Ref:
        if not text.startswith("tpm2:"):
            raise BadKeyUri("a TPM reference must start with 'tpm2:'", uri=text)
        path, _, query = text[len("tpm2:"):].partition("?")
        p = {k: v.decode() for k, v in _split_attrs(path, ";", text, frozenset({"handle", "blob", "sealed"})).items()}
        q = {k: v.decode() for k, v in _split_attrs(query, "&", text, frozenset({"tcti", "pcrs"})).items()}
        if len(p) != 1:
            raise BadKeyUri("name exactly one of handle=, blob= or sealed=", uri=text)
        handle = None
        if "handle" in p:
            try:
                handle = int(p["handle"], 0)
            except ValueError:
                raise BadKeyUri("handle must be a number such as 0x81010001", uri=text) from None
            if not 0x81000000 <= handle <= 0x81FFFFFF:
                raise BadKeyUri("handle must be a persistent handle (0x81000000-0x81FFFFFF)", uri=text)
        bank: str = "sha256"
        pcrs: tuple[int, ...] = ()
        if "pcrs" in q:
            bank, _, sel = q["pcrs"].partition(":")
            if bank not in ("sha1", "sha256", "sha384") or not sel:
                raise BadKeyUri("pcrs must look like sha256:7,16", uri=text)
            try:
                pcrs = tuple(sorted({int(x) for x in sel.split(",")}))
            except ValueError:
                raise BadKeyUri("pcrs must look like sha256:7,16", uri=text) from None
            if any(not 0 <= x <= 23 for x in pcrs):
                raise BadKeyUri("PCR indices are 0..23", uri=text)
        tcti = q.get("tcti") or os.environ.get("TPM2TOOLS_TCTI") or os.environ.get("TCTI") or DEFAULT_TCTI
        return cls(handle=handle, blob=Path(p["blob"]) if "blob" in p else None,
                   sealed=Path(p["sealed"]) if "sealed" in p else None, tcti=tcti, pcrs=pcrs, pcr_bank=bank)

    def redacted(self) -> str:
        if self.handle is not None:
            target = f"handle={self.handle:#x}"
        elif self.blob is not None:
            target = f"blob={self.blob}"
        else:
            target = f"sealed={self.sealed}"
        query = f"tcti={self.tcti}"
        if self.pcrs:
            query += f"&pcrs={self.pcr_bank}:" + ",".join(map(str, self.pcrs))
        return f"tpm2:{target}?{query}"
