"""firmware-config/profiles: each profile is a valid configuration, and each fits the shipped gateway unit
(PKCS#11 PINs come from the unit's credential, the TPM is the device the unit allows, state in StateDirectory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from hsm.uri import Pkcs11Uri, Tpm2Ref
from tests.deploy.units import credentials, parse_unit, values

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted((ROOT / "firmware-config" / "profiles").glob("*.yaml"))
UNIT = parse_unit(ROOT / "systemd" / "agw-gateway.service")


def test_the_three_profiles_exist() -> None:
    assert {p.stem for p in PROFILES} >= {"softhsm-dev", "rpi-tpm", "usb-token"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_loads_and_fits_the_unit(profile: Path) -> None:
    cfg = load_config(profile)
    assert cfg.paths.state_dir == Path("/var/lib/agw")  # StateDirectory=agw
    assert cfg.relay is not None and cfg.relay.ca_file.parent == Path("/etc/agw")  # ConfigurationDirectory=agw
    for uri in (cfg.keys.identity, cfg.keys.storage):
        if uri.startswith("pkcs11:"):
            p11 = Pkcs11Uri.parse(uri)
            assert p11.pin_value is None, "no PIN in a profile"
            assert p11.pin_source is not None and p11.pin_source.startswith("cred:")
            assert p11.pin_source[5:] in credentials(UNIT), "the unit must load that credential"
        else:
            ref = Tpm2Ref.parse(uri)
            device = ref.tcti.removeprefix("device:")
            assert values(UNIT, "Service", "DeviceAllow") == [f"{device} rw"]
            if ref.sealed is not None:
                assert ref.sealed.parent == cfg.paths.state_dir


def test_tpm_profile_uses_p256() -> None:
    cfg = load_config(ROOT / "firmware-config" / "profiles" / "rpi-tpm.yaml")
    assert cfg.keys.algorithm.value == "ecdsa-p256"  # a TPM has no Ed25519


def _role_config(**overrides: object) -> str:
    """The gateway role's agw.yaml rendered from its defaults (+ overrides), resolving defaults that refer to other
    defaults the way Ansible's lazy templating does."""
    import json

    import jinja2
    import yaml

    env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
                             autoescape=False)
    env.filters["to_json"] = json.dumps
    role = ROOT / "ansible" / "roles" / "gateway"
    variables: dict[str, object] = {**yaml.safe_load((role / "defaults" / "main.yml").read_text()), **overrides,
                                    "inventory_hostname_short": "pi-17", "playbook_dir": "/tmp",
                                    "ansible_managed": "Ansible managed"}
    for _ in range(5):
        variables = {k: env.from_string(v).render(variables) if isinstance(v, str) else v
                     for k, v in variables.items()}
    return env.from_string((role / "templates" / "agw.yaml.j2").read_text()).render(variables)


@pytest.mark.parametrize(("backend", "profile", "extra"), [
    ("tpm", "rpi-tpm", {}),
    ("pkcs11", "usb-token", {"gateway_pkcs11_module": "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so"}),
    ("softhsm", "softhsm-dev", {}),
])
def test_ansible_role_writes_the_profile_keys(tmp_path: Path, backend: str, profile: str,
                                              extra: dict[str, str]) -> None:
    """What the playbook writes for each backend is a valid config with the same keys as the matching profile."""
    cfg_file = tmp_path / "agw.yaml"
    cfg_file.write_text(_role_config(gateway_key_backend=backend, **extra))
    cfg = load_config(cfg_file)
    ref = load_config(ROOT / "firmware-config" / "profiles" / f"{profile}.yaml")
    assert (cfg.keys.identity, cfg.keys.storage, cfg.keys.algorithm) == \
        (ref.keys.identity, ref.keys.storage, ref.keys.algorithm)
    assert cfg.device.id == "pi-17"
