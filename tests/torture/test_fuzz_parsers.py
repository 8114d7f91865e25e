"""Hostile input: every parser that takes bytes from outside sees random bytes and mutations of genuine inputs,
and may only answer with a declared error (`ProtocolError` subclasses; `ConfigError` for configuration files).

Short run: FUZZ_SHORT examples per parser (in `make test`); AGW_TORTURE=long: FUZZ_LONG (>= 100,000) per
parser. Any other exception is a crash and fails the test; the counts go to the figures report.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load_config
from gateway.protocol.envelope import Envelope, EnvelopeKind
from gateway.protocol.errors import ProtocolError
from gateway.protocol.group_ack import GroupAck
from gateway.protocol.identity.credential import decode_credential, encode_credential
from gateway.protocol.identity.signer import SoftwareSigner
from gateway.protocol.identity.tokens import mint_relay_token, verify_relay_token
from gateway.protocol.identity.trust import FleetTrust
from gateway.protocol.identity.x509build import DEVICE, FLEET_CA, build_csr, issue_certificate
from gateway.protocol.link import (
    Auth,
    AuthOk,
    Challenge,
    ClientLink,
    Deliver,
    Envelopes,
    LinkLimits,
    ServerLink,
    decode_frame,
    encode_frame,
)
from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.protocol.mls.crypto import Ed25519Signer, get_suite
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.proposals import Remove
from gateway.protocol.mls.welcome_structs import GroupInfo
from gateway.protocol.pairwise import PairwiseBatch, PairwiseMessage, PairwiseSession, PrekeyBundle, PrekeyStore
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice
from hsm.api import KeyAlgorithm
from tests.mls.test_group import Member, _group
from tests.torture.conftest import LONG, record

FUZZ_SHORT = 1500
FUZZ_LONG = 100_000
EXAMPLES = int(os.environ.get("AGW_TORTURE_FUZZ", FUZZ_LONG if LONG else FUZZ_SHORT))

# -- genuine samples: the mutation seeds ------------------------------------------------------------------------
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
FLEET = "torture.local"
_ca_key = SoftwareSigner.generate(KeyAlgorithm.ECDSA_P256)
_ca = issue_certificate(_ca_key, issuer=None, subject_key=_ca_key.public_key(), common_name="torture CA",
                        organization=FLEET, san_uri=f"spiffe://{FLEET}", serial=1,
                        not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=30),
                        profile=FLEET_CA)
_dev_key = SoftwareSigner.generate(KeyAlgorithm.ED25519)
_csr = build_csr(_dev_key, common_name="pi-1", organization=FLEET, san_uri=f"spiffe://{FLEET}/device/pi-1")
_dev = issue_certificate(_ca_key, issuer=_ca, subject_key=_csr.public_key(), common_name="pi-1",
                         organization=FLEET, san_uri=f"spiffe://{FLEET}/device/pi-1", serial=100,
                         not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(days=10),
                         profile=DEVICE)
TRUST = FleetTrust(_ca)
CHALLENGE = os.urandom(32)
AUDIENCE = f"relay.{FLEET}"
TOKEN = mint_relay_token(_dev_key, chain=[_dev, _ca], audience=AUDIENCE, challenge=CHALLENGE,
                         now=int(NOW.timestamp()))
CREDENTIAL = encode_credential([_dev, _ca])

AUTHORITY = ToyAuthority()
ALICE = ToyDevice.make(AUTHORITY, "dev-alice")
BOB = ToyDevice.make(AUTHORITY, "dev-bob")
BUNDLE = BOB.prekeys.bundle(device_id=BOB.device_id, credential=BOB.credential, signer=BOB.signer)
_init = PairwiseSession.initiate(local_device_id=ALICE.device_id, credential=ALICE.credential, signer=ALICE.signer,
                                 bundle=BUNDLE, verify_credential=AUTHORITY.verify_credential)
SETUP = _init.encrypt(b"setup")
_resp, _ = PairwiseSession.accept(SETUP, local_device_id=BOB.device_id, signer=BOB.signer,
                                  prekeys=PrekeyStore.decode(BOB.prekeys.encode()),
                                  verify_credential=AUTHORITY.verify_credential)
_init.decrypt(_resp.encrypt(b"reply"))
RATCHET = _init.encrypt(b"ratchet message")
BATCH = _init.encrypt_batch([b"batched one", b"batched two", b"three"])
SESSION = _resp.encode()

INNER = InnerMessage(kind=Kind.DATA, message_id=new_message_id(), sender_agent="alice", recipient_agent="bob",
                     created_at_ms=1, expires_at_ms=2, payload=b"hello", response_topic="agw/alice/reply/x",
                     correlation_data=b"c", content_type="text/plain", user_properties=(("k", "v"),)).encode()
ACK = InnerMessage(kind=Kind.ACK, message_id=new_message_id(), sender_agent="bob", recipient_agent="alice",
                   created_at_ms=1, expires_at_ms=2, ids=(new_message_id(),)).encode()
ENVELOPE = Envelope(EnvelopeKind.PAIRWISE, os.urandom(16), "dev-a", "dev-b", RATCHET).serialize()
LIMITS = LinkLimits()
FRAMES = [encode_frame(Deliver((Envelope.parse(ENVELOPE),))), encode_frame(Challenge(CHALLENGE, AUDIENCE)),
          encode_frame(AuthOk("dev-a", 2**40, 30))]

_mls_a, _mls_b, _mls_c = _group(1, 3)
MLS_MSGS = [_mls_a.g.encrypt_application(b"payload", b"aad").to_bytes(),
            _mls_c.g.propose(Remove(_mls_a.g.own_leaf)).to_bytes(),
            _mls_a.g.commit(include_pending=False).message.to_bytes()]
_joiner = Member("joiner", 1)
KEY_PACKAGE = _joiner.key_package().key_package.to_bytes()
GROUP_INFO = _mls_a.g.group_info().to_bytes()

_ACK_SIGNER = Ed25519Signer(bytes(range(32)))
GROUP_ACK = GroupAck(b"team", "pi-1/planner", "pi-2", (os.urandom(16), os.urandom(16))).signed(_ACK_SIGNER).to_bytes()
_ACK_SUITE = get_suite(1)

CONFIG = b"""device: { fleet: fleet.example, id: pi-17 }
keys:
  identity: "pkcs11:token=agw;object=agw-identity?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/p"
  storage:  "pkcs11:token=agw;object=agw-storage?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/p"
  algorithm: ed25519
paths:   { state_dir: /var/lib/agw }
relay:   { url: "wss://relay.fleet.example:443", ca_file: /etc/agw/relay-ca.pem, audience: relay.fleet.example }
mqtt:    { host: 127.0.0.1, port: 1883, username: agw-gateway, password_file: /etc/agw/mqtt-password }
agents:
  planner: { allow: ["pi-20/sensor", "pi-21/*"] }
"""
_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="agw-fuzz-config-"))


# -- the parsers under test --------------------------------------------------------------------------------------
def _client_link(data: bytes) -> None:
    link = ClientLink(LIMITS)
    link.receive_data(FRAMES[1])
    link.authenticate(TOKEN)
    link.receive_data(FRAMES[2])
    link.receive_data(data)
    link.events_received()


def _server_link(data: bytes) -> None:
    link = ServerLink(LIMITS)
    link.challenge(CHALLENGE, AUDIENCE)
    link.receive_data(data)
    link.events_received()


def _token(data: bytes) -> None:
    verify_relay_token(data.decode("latin-1"), trust=TRUST, audience=AUDIENCE, challenge=CHALLENGE,
                       now=int(NOW.timestamp()))


def _config(data: bytes) -> None:
    # Raw bytes (a non-UTF-8 file is a ConfigError since 1f8a7e0) and, as often, the same bytes made UTF-8 so
    # that the fuzzer keeps exploring YAML and model validation.
    path = _CONFIG_DIR / "agw.yaml"
    path.write_bytes(data if len(data) % 2 else data.decode("utf-8", "replace").encode("utf-8"))
    load_config(path)


def _bundle(data: bytes) -> None:
    PrekeyBundle.decode(data).verify(AUTHORITY.verify_credential)


def _session_decrypt(data: bytes) -> None:
    PairwiseSession.decode(SESSION, signer=BOB.signer).decrypt(data)


def _batch_decrypt(data: bytes) -> None:
    PairwiseSession.decode(SESSION, signer=BOB.signer).decrypt_batch(data, sender_device_id=ALICE.device_id)


def _accept(data: bytes) -> None:
    PairwiseSession.accept(data, local_device_id=BOB.device_id, signer=BOB.signer,
                           prekeys=PrekeyStore.decode(BOB.prekeys.encode()),
                           verify_credential=AUTHORITY.verify_credential)


def _group_ack(data: bytes) -> None:
    GroupAck.from_bytes(data).verify(_ACK_SUITE, _ACK_SIGNER.public_key)


def _group_process(data: bytes) -> None:
    _mls_b.g.process(data)


PARSERS: dict[str, tuple[Callable[[bytes], object], list[bytes], tuple[type[Exception], ...]]] = {
    "envelope": (Envelope.parse, [ENVELOPE], (ProtocolError,)),
    "link_frame": (lambda d: decode_frame(d, LIMITS), FRAMES, (ProtocolError,)),
    "client_link": (_client_link, FRAMES, (ProtocolError,)),
    "server_link": (_server_link, [encode_frame(Auth(TOKEN)), encode_frame(Envelopes((Envelope.parse(ENVELOPE),)))],
                    (ProtocolError,)),
    "pairwise_message": (PairwiseMessage.parse, [SETUP, RATCHET], (ProtocolError,)),
    "pairwise_batch": (PairwiseBatch.parse, [BATCH], (ProtocolError,)),
    "pairwise_batch_decrypt": (_batch_decrypt, [BATCH], (ProtocolError,)),
    "prekey_bundle": (_bundle, [BUNDLE.encode()], (ProtocolError,)),
    "pairwise_decrypt": (_session_decrypt, [RATCHET, SETUP], (ProtocolError,)),
    "pairwise_accept": (_accept, [SETUP], (ProtocolError,)),
    "inner_message": (InnerMessage.decode, [INNER, ACK], (ProtocolError,)),
    "relay_token": (_token, [TOKEN.encode()], (ProtocolError,)),
    "credential": (decode_credential, [CREDENTIAL], (ProtocolError,)),
    "config": (_config, [CONFIG], (ConfigError,)),
    "mls_message": (MLSMessage.from_bytes, MLS_MSGS, (ProtocolError,)),
    "mls_key_package": (KeyPackage.from_bytes, [KEY_PACKAGE], (ProtocolError,)),
    "mls_group_info": (GroupInfo.from_bytes, [GROUP_INFO], (ProtocolError,)),
    "mls_group_process": (_group_process, MLS_MSGS, (ProtocolError,)),
    "group_ack": (_group_ack, [GROUP_ACK], (ProtocolError,)),
}
_SLOW = {"mls_group_process": 4, "relay_token": 2, "pairwise_accept": 2, "pairwise_decrypt": 2,
         "pairwise_batch_decrypt": 2, "config": 2}


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A genuine input with a few byte-level edits: reaches much deeper than random bytes."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "extend", "delete", "insert"]))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x22, 0x0A]))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


# Crashes found by this fuzzer and reported to the owner, each reproduced deterministically by an xfail(strict)
# test below. The fuzzer counts them as `known_bug` (in the figures) instead of failing at random; a new kind
# of crash still fails. When the owner fixes one, its strict xfail test passes unexpectedly and fails the run,
# which is the signal to delete the entry here.
KNOWN_BUGS: dict[str, tuple[tuple[type[Exception], ...], str]] = {}


def _bad_version(der: bytes) -> bytes:
    """The first certificate's version field set to 3 (X.509 knows v1..v3 as 0..2)."""
    i = der.index(b"\xa0\x03\x02\x01\x02")
    return der[: i + 4] + b"\x03" + der[i + 5 :]


def test_credential_with_bad_certificate_version() -> None:
    with pytest.raises(ProtocolError):
        decode_credential(_bad_version(CREDENTIAL))


def test_token_with_bad_certificate_version() -> None:
    header, claims, sig = TOKEN.split(".")
    h = json.loads(base64.urlsafe_b64decode(header + "=="))
    h["x5c"][0] = base64.b64encode(_bad_version(base64.b64decode(h["x5c"][0]))).decode()
    forged = base64.urlsafe_b64encode(json.dumps(h).encode()).rstrip(b"=").decode() + "." + claims + "." + sig
    with pytest.raises(ProtocolError):
        _token(forged.encode())


def test_seeds_are_accepted() -> None:
    """The seeds are genuine, so the mutations start from input that gets past the first checks."""
    for name in ("envelope", "link_frame", "pairwise_message", "prekey_bundle", "inner_message", "relay_token",
                 "credential", "config", "mls_message", "mls_key_package", "mls_group_info", "client_link",
                 "group_ack"):
        fn, seeds, _ = PARSERS[name]
        for seed in seeds[:1] if name == "client_link" else seeds:
            fn(seed)
    _session_decrypt(RATCHET)
    _server_link(PARSERS["server_link"][1][0])


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_raises_only_declared_errors(name: str) -> None:
    fn, seeds, declared = PARSERS[name]
    n = max(EXAMPLES // _SLOW.get(name, 1), 1) if not LONG else EXAMPLES
    stats = {"inputs": 0, "rejected": 0, "accepted": 0, "known_bug": 0}
    known = KNOWN_BUGS.get(name, ((), ""))[0]
    crashes: list[str] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=600), mutated(seeds), mutated(seeds)))
    def run(data: bytes) -> None:
        stats["inputs"] += 1
        try:
            fn(data)
        except declared:
            stats["rejected"] += 1
            return
        except known:
            stats["known_bug"] += 1
            return
        except Exception as exc:  # anything undeclared is the finding
            crashes.append(f"{type(exc).__name__}: {exc} on {data[:80]!r}")
            raise
        stats["accepted"] += 1

    t0 = time.monotonic()
    try:
        run()
    finally:
        record(f"fuzz.{name}", inputs=stats["inputs"], rejected=stats["rejected"], accepted=stats["accepted"],
               known_bug=stats["known_bug"], crashes=len(crashes), seconds=round(time.monotonic() - t0, 1))
    assert not crashes, crashes[:3]
    assert stats["inputs"] >= n  # hypothesis really ran the configured number of inputs


def test_config_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agw.yaml"
    path.write_bytes(CONFIG.replace(b"pi-17", b"pi-\x8017"))
    with pytest.raises(ConfigError, match=r"agw\.yaml"):
        load_config(path)
