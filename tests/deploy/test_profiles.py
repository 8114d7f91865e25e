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
