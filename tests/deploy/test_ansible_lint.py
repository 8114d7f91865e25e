"""ansible/ passes ansible-lint with the production profile, and the example inventory parses into the groups
site.yml targets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
VENV_BIN = Path(sys.executable).parent


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    out = subprocess.run([str(VENV_BIN / "ansible-lint"), "--profile", "production", "--nocolor"], cwd=ANSIBLE,
                         capture_output=True, text=True, timeout=180,
                         env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
                              "ANSIBLE_HOME": str(tmp_path / "ansible")})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in out.stdout + out.stderr


def test_example_inventory_has_raspberry_pis_and_a_relay(tmp_path: Path) -> None:
    out = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", "inventory/example/hosts.yml", "--list"],
                         cwd=ANSIBLE, capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(tmp_path),
                              "ANSIBLE_HOME": str(tmp_path / "ansible")})
    assert out.returncode == 0, out.stderr
    inv = json.loads(out.stdout)
    assert inv["relays"]["hosts"] == ["relay-1"]
    assert set(inv["gateways"]["children"]) == {"pis_tpm", "pis_usb_token"}
    hostvars = inv["_meta"]["hostvars"]
    assert hostvars["pi-17"]["hsm_backend"] == "tpm" and hostvars["pi-20"]["hsm_backend"] == "pkcs11"
