"""Errors of the hardware key layer.

Every error names the key URI (with any PIN removed) and, where the hardware gave one, its return code, so an
operator can act on it. No message ever contains a PIN or key bytes.
"""

from __future__ import annotations


class HsmError(Exception):
    """Root of every error raised by `hsm`."""

    def __init__(self, message: str, *, uri: str | None = None, rc: str | None = None) -> None:
        self.uri = uri
        self.rc = rc
        parts = [message]
        if uri:
            parts.append(f"uri={uri}")
        if rc:
            parts.append(f"rc={rc}")
        super().__init__(" | ".join(parts))


class BadKeyUri(HsmError):
    """A `pkcs11:` or `tpm2:` reference could not be parsed or lacks a required part."""


class LibraryNotFound(HsmError):
    """The PKCS#11 module (or the TPM TSS library) could not be loaded."""


class TokenNotFound(HsmError):
    """No token with the requested label, serial or slot is present."""


class PinIncorrect(HsmError):
    """The token refused the PIN (never shown)."""


class PinUnavailable(HsmError):
    """The PIN source (file or environment variable) could not be read."""


class KeyNotFound(HsmError):
    """The referenced key does not exist on the token or in the TPM."""


class KeyExists(HsmError):
    """A key already exists where one would be created; pass force to replace it."""


class WrongKeyType(HsmError):
    """The key exists but has a different type or algorithm than the one required."""


class KeyPolicyViolation(HsmError):
    """The key is usable but unsafe: e.g. an identity key that is extractable or not sensitive."""


class TpmUnreachable(HsmError):
    """The TPM (device or simulator TCTI) could not be opened."""


class UnsealFailed(HsmError):
    """The TPM refused to unseal the storage secret (e.g. the PCR policy no longer matches)."""


class UnwrapFailed(HsmError):
    """A wrapped blob could not be unwrapped: corrupt, or wrapped by another storage key."""


class HardwareError(HsmError):
    """Any other failure reported by the token or TPM, with its return code."""
