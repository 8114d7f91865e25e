"""Prekey bundles (public, signed) and the prekey store (private, persistent)."""

from __future__ import annotations

import pytest

from gateway.protocol.pairwise import (
    CredentialError,
    Ed25519Signer,
    PairwiseDecodeError,
    PairwiseVerificationError,
    PrekeyBundle,
    PrekeyError,
    PrekeyStore,
)
from gateway.protocol.pairwise.crypto import x25519_public
from gateway.protocol.pairwise.prekeys import MAX_ONE_TIME_PREKEYS, MAX_RETIRED_SIGNED_PREKEYS, OneTimePrekey
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice


@pytest.fixture
def authority() -> ToyAuthority:
    return ToyAuthority()


@pytest.fixture
def device(authority: ToyAuthority) -> ToyDevice:
    return ToyDevice.make(authority, "dev-1", now_ms=1000, one_time=3)


def bundle_of(device: ToyDevice) -> PrekeyBundle:
    return device.prekeys.bundle(device_id=device.device_id, credential=device.credential, signer=device.signer)


def test_bundle_round_trip_and_verify(device: ToyDevice, authority: ToyAuthority) -> None:
    bundle = bundle_of(device)
    assert len(bundle.one_time_prekeys) == 3
    decoded = PrekeyBundle.decode(bundle.encode())
    assert decoded == bundle
    assert decoded.verify(authority.verify_credential).raw == device.signer.verify_key
    assert decoded.signed_prekey.created_at_ms == 1000


def test_bundle_without_one_time_prekeys(device: ToyDevice, authority: ToyAuthority) -> None:
    bundle = device.prekeys.bundle(device_id=device.device_id, credential=device.credential, signer=device.signer,
                                   include_one_time=False)
    assert bundle.one_time_prekeys == ()
    PrekeyBundle.decode(bundle.encode()).verify(authority.verify_credential)


def test_directory_can_hand_out_one_prekey_at_a_time(device: ToyDevice, authority: ToyAuthority) -> None:
    bundle = bundle_of(device)
    for opk in bundle.one_time_prekeys:
        bundle.with_one_time_prekeys((opk,)).verify(authority.verify_credential)


@pytest.mark.parametrize("field", ["spk-public", "spk-created", "spk-signature", "opk-public", "opk-id"])
def test_tampered_bundle_is_refused(device: ToyDevice, authority: ToyAuthority, field: str) -> None:
    b = bundle_of(device)
    spk, opk = b.signed_prekey, b.one_time_prekeys[0]
    flip = bytes([spk.public_key[0] ^ 1]) + spk.public_key[1:]
    tampered = {
        "spk-public": PrekeyBundle(b.device_id, b.credential, type(spk)(spk.prekey_id, flip, spk.created_at_ms,
                                                                        spk.signature)),
        "spk-created": PrekeyBundle(b.device_id, b.credential, type(spk)(spk.prekey_id, spk.public_key, 5,
                                                                         spk.signature)),
        "spk-signature": PrekeyBundle(b.device_id, b.credential, type(spk)(spk.prekey_id, spk.public_key,
                                                                           spk.created_at_ms, bytes(64))),
        "opk-public": b.with_one_time_prekeys((OneTimePrekey(opk.prekey_id, flip, opk.signature),)),
        "opk-id": b.with_one_time_prekeys((OneTimePrekey(opk.prekey_id + 100, opk.public_key, opk.signature),)),
    }[field]
    with pytest.raises(PairwiseVerificationError):
        PrekeyBundle.decode(tampered.encode()).verify(authority.verify_credential)


def test_bundle_moved_to_another_device_is_refused(device: ToyDevice, authority: ToyAuthority) -> None:
    """Prekey signatures name the device, so a directory cannot serve one device's prekeys as another's."""
    other = ToyDevice.make(authority, "dev-2")
    b = bundle_of(device)
    forged = PrekeyBundle(other.device_id, other.credential, b.signed_prekey, b.one_time_prekeys)
    with pytest.raises(PairwiseVerificationError):
        forged.verify(authority.verify_credential)
    with pytest.raises(CredentialError):  # and its own credential does not name the other device
        PrekeyBundle(other.device_id, device.credential, b.signed_prekey).verify(authority.verify_credential)


def test_duplicate_prekey_ids_are_refused(device: ToyDevice, authority: ToyAuthority) -> None:
    b = bundle_of(device)
    doubled = b.with_one_time_prekeys((b.one_time_prekeys[0], b.one_time_prekeys[0]))
    with pytest.raises(PairwiseVerificationError, match="duplicate"):
        doubled.verify(authority.verify_credential)


def test_signed_prekey_age(device: ToyDevice, authority: ToyAuthority) -> None:
    b = bundle_of(device)  # created at 1000 ms
    b.verify(authority.verify_credential, now_ms=1000 + 7_000, max_signed_prekey_age_ms=7_000)
    with pytest.raises(PairwiseVerificationError, match="fresh bundle"):
        b.verify(authority.verify_credential, now_ms=1000 + 7_001, max_signed_prekey_age_ms=7_000)


def test_bundle_decode_is_strict(device: ToyDevice) -> None:
    encoded = bundle_of(device).encode()
    with pytest.raises(PairwiseDecodeError, match="trailing"):
        PrekeyBundle.decode(encoded + b"\x00")
    with pytest.raises(PairwiseDecodeError, match="version"):
        PrekeyBundle.decode(b"\x02" + encoded[1:])
    for cut in range(0, len(encoded), 7):
        with pytest.raises(PairwiseDecodeError):
            PrekeyBundle.decode(encoded[:cut])


def test_store_round_trip_keeps_every_key(device: ToyDevice) -> None:
    store = device.prekeys
    store.rotate_signed_prekey(now_ms=2000)
    restored = PrekeyStore.decode(store.encode())
    assert restored.encode() == store.encode()
    assert restored.current_signed_prekey_id == store.current_signed_prekey_id
    bundle = bundle_of(device)
    for opk in bundle.one_time_prekeys:
        private, public = restored.one_time_prekey(opk.prekey_id)
        assert public == opk.public_key == x25519_public(private)
    assert restored.signed_prekey(bundle.signed_prekey.prekey_id)[1] == bundle.signed_prekey.public_key


def test_one_time_prekeys_are_consumed_once_and_ids_never_reused(device: ToyDevice) -> None:
    store = device.prekeys
    first = bundle_of(device).one_time_prekeys[0].prekey_id
    store.consume_one_time_prekey(first)
    with pytest.raises(PrekeyError):
        store.one_time_prekey(first)
    with pytest.raises(PrekeyError):
        store.consume_one_time_prekey(first)
    new_ids = store.add_one_time_prekeys(2)
    assert first not in new_ids and store.one_time_count == 4
    assert first not in {o.prekey_id for o in bundle_of(device).one_time_prekeys}
    assert PrekeyStore.decode(store.encode()).one_time_count == 4


def test_signed_prekey_rotation_keeps_a_bounded_history(device: ToyDevice) -> None:
    store = device.prekeys
    ids = [store.current_signed_prekey_id]
    for t in range(1, 8):
        ids.append(store.rotate_signed_prekey(now_ms=1000 + t * 100))
    kept = ids[-(1 + MAX_RETIRED_SIGNED_PREKEYS):]
    for pid in kept:
        store.signed_prekey(pid)
    with pytest.raises(PrekeyError):
        store.signed_prekey(ids[0])
    store.prune_retired(now_ms=1700, max_retired_age_ms=150)  # retired at 1600 and 1700 stay
    store.signed_prekey(ids[-1])
    store.signed_prekey(ids[-2])
    store.signed_prekey(ids[-3])
    with pytest.raises(PrekeyError):
        store.signed_prekey(ids[-4])
    assert PrekeyStore.decode(store.encode()).encode() == store.encode()


def test_store_capacity_is_bounded() -> None:
    store = PrekeyStore.generate(now_ms=0, one_time_count=MAX_ONE_TIME_PREKEYS)
    with pytest.raises(PrekeyError):
        store.add_one_time_prekeys(1)


def test_store_decode_rejects_inconsistent_state(device: ToyDevice) -> None:
    encoded = bytearray(device.prekeys.encode())
    with pytest.raises(PairwiseDecodeError, match="version"):
        PrekeyStore.decode(b"\x09" + bytes(encoded[1:]))
    encoded[1:9] = (1).to_bytes(8, "big")  # next id below the ids in use
    with pytest.raises(PairwiseDecodeError, match="ids"):
        PrekeyStore.decode(bytes(encoded))


def test_bundle_is_signed_by_the_signer_given(device: ToyDevice, authority: ToyAuthority) -> None:
    """After a delegated-key rotation the bundle must be re-published; an old credential no longer matches."""
    rotated = Ed25519Signer.generate()
    stale = device.prekeys.bundle(device_id=device.device_id, credential=device.credential, signer=rotated)
    with pytest.raises(PairwiseVerificationError):
        stale.verify(authority.verify_credential)
    fresh = device.prekeys.bundle(device_id=device.device_id,
                                  credential=authority.issue(device.device_id, rotated.verify_key), signer=rotated)
    assert fresh.verify(authority.verify_credential).raw == rotated.verify_key


def test_local_construction_is_validated(device: ToyDevice) -> None:
    from gateway.protocol.pairwise import RatchetHeader, SignedPrekey

    with pytest.raises(ValueError):
        SignedPrekey(1, b"short", 0, bytes(64))
    with pytest.raises(ValueError):
        OneTimePrekey(2**32, bytes(32), bytes(64))
    with pytest.raises(ValueError):
        RatchetHeader(bytes(32), 0, -1, bytes(24))
    with pytest.raises(ValueError):
        PrekeyBundle("dev", b"", bundle_of(device).signed_prekey)
