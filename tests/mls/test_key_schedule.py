"""key-schedule.json: five consecutive epochs of the RFC 9420 key schedule, suites 1 and 3.

Format per entry: cipher_suite, group_id, initial_init_secret, epochs[{tree_hash, commit_secret, psk_secret,
confirmed_transcript_hash, group_context, joiner_secret, welcome_secret, init_secret, sender_data_secret,
encryption_secret, exporter_secret, epoch_authenticator, external_secret, confirmation_key, membership_key,
resumption_psk, external_pub, exporter{label, context, length, secret}}]. Epoch n has epoch number n and empty
GroupContext extensions. Checks: the GroupContext encoding, every derived secret, the exporter, the external
key pair and (round trip) the external-init exchange with it.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls import crypto, key_schedule
from gateway.protocol.mls.codec import Writer

from .conftest import unhex, vector_params


def _group_context(suite: int, group_id: bytes, epoch: int, tree_hash: bytes, cth: bytes) -> bytes:
    # GroupContext: version mls10, cipher_suite, group_id<V>, epoch, tree_hash<V>, confirmed_transcript_hash<V>,
    # extensions<V> (empty here).
    return Writer().u16(1).u16(suite).opaque(group_id).u64(epoch).opaque(tree_hash).opaque(cth).opaque(b"").bytes()


@pytest.mark.parametrize("v", vector_params("key-schedule.json"))
def test_key_schedule_vector(v: dict[str, Any]) -> None:
    cs = crypto.get_suite(v["cipher_suite"])
    init_secret = unhex(v["initial_init_secret"])
    group_id = unhex(v["group_id"])
    assert len(v["epochs"]) > 0
    for n, e in enumerate(v["epochs"]):
        cth = unhex(e["confirmed_transcript_hash"])
        gc = _group_context(v["cipher_suite"], group_id, n, unhex(e["tree_hash"]), cth)
        assert gc == unhex(e["group_context"])
        s = key_schedule.advance(cs, init_secret, unhex(e["commit_secret"]), unhex(e["psk_secret"]), gc)
        for name in ("joiner_secret", "welcome_secret", "init_secret", "sender_data_secret", "encryption_secret",
                     "exporter_secret", "epoch_authenticator", "external_secret", "confirmation_key",
                     "membership_key", "resumption_psk"):
            assert getattr(s, name) == unhex(e[name]), name
        assert key_schedule.welcome_secret(cs, s.joiner_secret, unhex(e["psk_secret"])) == s.welcome_secret
        x = e["exporter"]
        # The exporter label is a string (that happens to look like hex); it is used as its UTF-8 bytes.
        assert s.exporter(cs, x["label"].encode(), unhex(x["context"]), x["length"]) == unhex(x["secret"])
        priv, pub = s.external_key_pair(cs)
        assert pub == unhex(e["external_pub"])
        kem_output, joiner_init = key_schedule.external_init_sender(cs, pub)
        assert key_schedule.external_init_receiver(cs, priv, kem_output) == joiner_init
        init_secret = s.init_secret


def test_epoch_secrets_repr_hides_secrets() -> None:
    cs = crypto.get_suite(1)
    s = key_schedule.advance(cs, b"\x01" * 32, b"\x02" * 32, bytes(32), b"ctx")
    r = repr(s)
    for name in ("init_secret", "encryption_secret", "exporter_secret", "membership_key"):
        assert getattr(s, name).hex() not in r
