"""What the daemon imports is resident memory for its whole life (docs/performance.md, "Memory"). asn1crypto
(~3-4 MB of RSS with its dependencies) is needed only to build certificates, CSRs and CRLs
(gateway/protocol/identity/x509build.py); loading the daemon's modules and the TPM backend must not import it.
(python-pkcs11 imports it itself, so a PKCS#11 device holds it either way.)"""

from __future__ import annotations

import subprocess
import sys


def _lines_printed_by(code: str) -> list[str]:
    """Run `code` in a fresh interpreter (nothing imported yet) and return what it printed, line by line."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split("\n")


def test_the_daemon_does_not_import_asn1crypto_until_it_builds_a_certificate() -> None:
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups, hsm.tpm2_backend\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asn1crypto'))\n"
            "from gateway.protocol.identity import x509build\n"
            "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
            "x509build.key_identifier(ed25519.Ed25519PrivateKey.generate().public_key())\n"
            "print('asn1crypto.keys' in sys.modules)\n")
    out = _lines_printed_by(code)
    assert out[0] == "[]"
    assert out[1] == "True"  # imported on first use


def test_the_group_service_imports_the_mls_engine_only_when_a_group_needs_it() -> None:
    """A gateway with agents runs the group service (it publishes their KeyPackages); the MLS engine (framing,
    group state, TreeKEM, Welcome) is imported once a group is created, joined or restored, or a group message
    arrives (tests/groups exercise those paths)."""
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups\n"
            "engine = ('framing', 'group', 'group_persist', 'welcome', 'welcome_structs', 'treekem', 'commit')\n"
            "print(sorted(m for m in sys.modules if m.startswith('gateway.protocol.mls.') and\n"
            "             m.rsplit('.', 1)[1] in engine))\n"
            "print('gateway.protocol.mls.key_package_bundle' in sys.modules)\n")
    out = _lines_printed_by(code)
    assert out[0] == "[]"
    assert out[1] == "True"  # KeyPackages are published at every link-ready
