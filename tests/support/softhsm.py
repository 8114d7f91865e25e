"""Real SoftHSM2 tokens for tests.

SoftHSM reads its configuration and token directory once, when the PKCS#11 module is initialised, and does not
see tokens created afterwards in the same process. So in-process tests share a pool of tokens created before the
first PKCS#11 call (`SoftHsmPool`), and tests that need a fresh module state run the CLI in subprocesses with a
`SoftHsmDir` of their own.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
USER_PIN = "4321-test-pin"
SO_PIN = "87654321"


@dataclass
class SoftHsmDir:
    """A SoftHSM configuration and token directory of its own."""

    root: Path

    def __post_init__(self) -> None:
        (self.root / "tokens").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"directories.tokendir = {self.root / 'tokens'}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def init_token(self, label: str, pin: str = USER_PIN) -> None:
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                        "--so-pin", SO_PIN], env=self.env, check=True, capture_output=True)

    def pin_file(self, pin: str = USER_PIN) -> Path:
        path = self.root / "pin"
        path.write_text(pin + "\n")
        path.chmod(0o600)
        return path

    def uri(self, token: str, obj: str) -> str:
        return f"pkcs11:token={token};object={obj}?module-path={MODULE}&pin-source=file:{self.pin_file()}"
