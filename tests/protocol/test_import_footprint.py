"""What the daemon imports is resident memory for its whole life (docs/performance.md, "Memory"). asn1crypto
(~1 MB of RSS with its dependencies) is needed only to build CSRs and CRLs (gateway/protocol/identity/x509build.py;
certificates are built without it) and to generate a PKCS#11 key; loading the daemon's modules and either
hardware backend, issuing certificates, and loading and using PKCS#11 keys, must not import it (python-pkcs11's
`pkcs11.util` helpers, which import it, are deferred: hsm/pkcs11_import.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hsm.api import KeyAlgorithm


def _lines_printed_by(code: str, env: dict[str, str] | None = None) -> list[str]:
    """Run `code` in a fresh interpreter (nothing imported yet) and return what it printed, line by line."""
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env=env).stdout.split("\n")


def test_the_daemon_does_not_import_asn1crypto_until_it_builds_a_certificate() -> None:
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups, hsm.tpm2_backend, hsm.pkcs11_backend\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asn1crypto'))\n"
            "from gateway.protocol.identity import x509build\n"
            "from gateway.protocol.identity.signer import SoftwareSigner\n"
            "from hsm.api import KeyAlgorithm\n"
            "s = SoftwareSigner.generate(KeyAlgorithm.ED25519)\n"
            "x509build.build_csr(s, common_name='pi-1', organization='acme', san_uri='spiffe://acme/pi-1')\n"
            "print('asn1crypto.keys' in sys.modules)\n")
    out = _lines_printed_by(code)
    assert out[0] == "[]"
    assert out[1] == "True"  # imported on first use (a CSR: `agw init`, never the daemon)


def test_issuing_certificates_does_not_import_asn1crypto() -> None:
    """A device issues its delegated certificates at first start and at each renewal (bench gateways: at every
    start); asn1crypto, once imported, stays resident (~1 MB). Issuing a whole chain must not import it."""
    code = ("import sys, datetime as dt\n"
            "import gateway.cli, gateway.daemon\n"
            "from gateway.protocol.identity.delegation import delegate\n"
            "from gateway.protocol.identity import x509build\n"
            "from gateway.protocol.identity.signer import SoftwareSigner\n"
            "from hsm.api import KeyAlgorithm\n"
            "now = dt.datetime.now(dt.UTC)\n"
            "for alg in KeyAlgorithm:\n"
            "    ca = SoftwareSigner.generate(alg)\n"
            "    c = x509build.issue_certificate(ca, issuer=None, subject_key=ca.public_key(), common_name='ca',\n"
            "        organization='acme', san_uri=None, serial=1, not_before=now,\n"
            "        not_after=now + dt.timedelta(days=9), profile=x509build.FLEET_CA)\n"
            "    d = x509build.issue_certificate(ca, issuer=c, subject_key=ca.public_key(), common_name='pi-1',\n"
            "        organization='acme', san_uri='spiffe://acme/pi-1', serial=2, not_before=now,\n"
            "        not_after=now + dt.timedelta(days=9), profile=x509build.DEVICE)\n"
            "    d.verify_directly_issued_by(c)\n"
            "    x509build.key_identifier(ca.public_key())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asn1crypto'))\n")
    assert _lines_printed_by(code)[0] == "[]"


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


@pytest.mark.parametrize("alg", list(KeyAlgorithm))
def test_loading_and_using_pkcs11_keys_does_not_import_asn1crypto(softhsm_dir, alg):
    """What the daemon does with its token at start-up and per message: load both keys, read the public key,
    sign, wrap and unwrap. Generating the key (another process here, `agw init` on a device) may import it."""
    softhsm_dir.init_token("agw")
    ident, storage = softhsm_dir.uri("agw", "agw-identity"), softhsm_dir.uri("agw", "agw-storage")
    _lines_printed_by(f"import hsm\nfrom hsm.api import KeyAlgorithm\n"
                      f"hsm.create_identity_key({ident!r}, KeyAlgorithm({alg.value!r}))\n"
                      f"hsm.create_storage_key({storage!r})\n", env=softhsm_dir.env)
    code = ("import sys\n"
            "import hsm, gateway.cli, gateway.daemon\n"
            f"key = hsm.load_identity_key({ident!r})\n"
            "print(key.algorithm.value, len(key.sign(b'x')) > 0, key.public_key() is not None)\n"
            f"sk = hsm.load_storage_key({storage!r})\n"
            "print(sk.unwrap(sk.wrap(bytes(32))) == bytes(32))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'asn1crypto'))\n"
            "from pkcs11.util.ec import encode_named_curve_parameters\n"
            "print(len(encode_named_curve_parameters('1.3.101.112')) > 0, 'asn1crypto.keys' in sys.modules)\n")
    out = _lines_printed_by(code, env=softhsm_dir.env)
    assert out[:4] == [f"{alg.value} True True", "True", "[]", "True True"]  # the helpers still load on first use


def test_the_daemon_leaves_urllib_request_and_importlib_metadata_unloaded_until_used() -> None:
    """paho imports urllib.request and websockets importlib.metadata, with http.client, email and zipfile behind
    them (~2 MB), and the daemon uses neither: gateway/deferred_imports.py loads them on first use."""
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups, hsm.pkcs11_backend\n"
            "print([type(sys.modules[n]).__name__ for n in ('urllib.request', 'importlib.metadata')])\n"
            "print(sorted(m for m in ('http.client', 'email.message', 'email.parser', 'zipfile', 'csv')\n"
            "             if m in sys.modules))\n"
            "import urllib.request, importlib.metadata, importlib.metadata._meta\n"
            "from importlib.metadata import version\n"
            "print(isinstance(urllib.request.getproxies(), dict),\n"
            "      version('websockets') == importlib.metadata.version('websockets'),\n"
            "      urllib.request.Request('http://x/').host, 'http.client' in sys.modules)\n")
    out = _lines_printed_by(code)
    assert out[0] == "['DeferredModule', 'DeferredModule']"
    assert out[1] == "[]"
    assert out[2] == "True True x True"  # loaded, and usable, on first use


def test_agw_leaves_email_utils_unloaded_until_used() -> None:
    """`cryptography.x509` binds `email.utils.parseaddr` at import (for RFC 822 names, which the daemon never
    builds); `email.utils` with `email.charset`, `email.encoders`, `quopri`, ... is ~0.4 MB. `agw` (gateway.cli,
    the daemon's entry point) installs the placeholders first, so it is loaded on the first call, and works."""
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups, hsm.pkcs11_backend\n"
            "from cryptography import x509\n"
            "print(type(sys.modules['email.utils']).__name__,\n"
            "      sorted(m for m in sys.modules if m.startswith('email.') and m != 'email.utils'))\n"
            "print(x509.RFC822Name('jo@example.com').value, type(sys.modules['email.utils']).__name__)\n"
            "try:\n"
            "    x509.RFC822Name('Jo <jo@example.com>')\n"
            "except ValueError:\n"
            "    print('refused')\n"
            "import email.utils, email.message\n"
            "from email.utils import formataddr\n"
            "print(formataddr(('Jo', 'jo@example.com')), email.utils.parseaddr('Jo <j@x>'),\n"
            "      email.message.EmailMessage() is not None)\n")
    out = _lines_printed_by(code)
    assert out[0] == "DeferredModule []"
    assert out[1] == "jo@example.com module"  # loaded on the first call
    assert out[2] == "refused"  # the real parseaddr found the display name
    assert out[3] == "Jo <jo@example.com> ('Jo', 'j@x') True"


def test_agw_leaves_uuid_unloaded_until_used() -> None:
    """paho imports `uuid` to make up a client id when it is given none; the bridge always gives one. `uuid` is a
    top-level module (no parent package to update) and is loaded on first use, e.g. through paho's reference."""
    code = ("import sys\n"
            "import gateway.cli, gateway.daemon, gateway.groups, hsm.pkcs11_backend\n"
            "print(type(sys.modules['uuid']).__name__, '_uuid' in sys.modules)\n"
            "import paho.mqtt.client as mqtt\n"
            "print(mqtt.uuid.uuid4().version, type(sys.modules['uuid']).__name__)\n"
            "import uuid\n"
            "print(uuid.UUID(int=5).version, str(uuid.uuid4()).count('-'))\n")
    out = _lines_printed_by(code)
    assert out[0] == "DeferredModule False"
    assert out[1] == "4 module"  # paho's reference (the placeholder) loaded it
    assert out[2] == "None 4"


def test_a_module_imported_before_the_daemon_is_left_alone() -> None:
    code = ("import sys, urllib.request\n"
            "real = sys.modules['urllib.request']\n"
            "import gateway.daemon\n"
            "print(sys.modules['urllib.request'] is real, type(sys.modules['importlib.metadata']).__name__)\n")
    assert _lines_printed_by(code)[0] == "True DeferredModule"
