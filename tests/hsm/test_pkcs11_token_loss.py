"""A PKCS#11 token that goes away while the process runs, and comes back.

Each case runs in a child process of its own (SoftHSM reads its token directory when the module is initialised),
driven line by line: the parent moves the token directory away, as pulling a USB token does to the module's
view, and back. Promised: while it is away, operations fail with our typed errors naming the token (no crash);
once it is back, the same key objects sign, wrap and unwrap again without a restart; a different token put back
under the same labels is refused, not used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.support.softhsm import SoftHsmDir

CHILD = textwrap.dedent("""
    import json, sys
    import hsm
    from hsm import KeyAlgorithm
    from cryptography.hazmat.primitives import serialization

    id_uri, st_uri = sys.argv[1], sys.argv[2]
    identity = hsm.create_identity_key(id_uri, KeyAlgorithm.ED25519)
    storage = hsm.create_storage_key(st_uri)
    blob = storage.wrap(b"k" * 32)
    pub = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    print(json.dumps({"ready": pub.hex()}), flush=True)
    for line in sys.stdin:
        out = {}
        try:
            out["sig"] = identity.sign(b"hello").hex()
            out["unwrap"] = storage.unwrap(blob) == b"k" * 32
            out["rewrap"] = storage.unwrap(storage.wrap(b"n" * 32)) == b"n" * 32
        except hsm.HsmError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(out), flush=True)
""")


class Child:
    def __init__(self, d: SoftHsmDir, label: str) -> None:
        d.init_token(label)
        id_uri, st_uri = d.uri(label, "identity"), d.uri(label, "storage")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, id_uri, st_uri], env=d.env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.read()["ready"]))

    def read(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited: {self.proc.wait(10)}; stderr:\n{self.proc.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(line)

    def attempt(self) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        return self.proc.stderr.read() if self.proc.stderr else ""


def _away(d: SoftHsmDir) -> Path:
    away = d.root / "tokens.away"
    shutil.move(d.root / "tokens", away)
    return away


def test_token_going_away_and_coming_back_while_running(tmp_path: Path) -> None:
    d = SoftHsmDir(tmp_path / "h")
    child = Child(d, "loss")
    try:
        before = child.attempt()
        child.public.verify(bytes.fromhex(str(before["sig"])), b"hello")
        assert before["unwrap"] is True and before["rewrap"] is True

        away = _away(d)
        for _ in range(2):  # still away on the second try: the same clear error, no crash
            gone = child.attempt()
            assert "error" in gone, gone
            assert str(gone["error"]).split(":")[0] in ("TokenNotFound", "HardwareError"), gone
            assert "token=loss" in str(gone["error"]), gone

        shutil.move(away, d.root / "tokens")
        back = child.attempt()
        assert "error" not in back, back
        child.public.verify(bytes.fromhex(str(back["sig"])), b"hello")
        assert back["unwrap"] is True and back["rewrap"] is True
    finally:
        stderr = child.close()
    assert child.proc.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr


def test_a_different_token_under_the_same_labels_is_refused(tmp_path: Path) -> None:
    d = SoftHsmDir(tmp_path / "h")
    child = Child(d, "swap")
    try:
        assert "sig" in child.attempt()
        _away(d)
        # An impostor: a new token with the same label, holding another key under the same object label.
        (d.root / "tokens").mkdir()
        impostor = Child(d, "swap")
        impostor.close()
        swapped = child.attempt()
        assert "error" in swapped, swapped
        assert str(swapped["error"]).startswith("KeyPolicyViolation"), swapped
        assert "different identity key" in str(swapped["error"]), swapped
    finally:
        child.close()
