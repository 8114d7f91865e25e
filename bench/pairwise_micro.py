"""Micro-benchmark of the pairwise channel: messages/s for encrypt+sign and verify+decrypt of 256-byte
payloads on one core, v1 (one signature per message) and v2 batches (one per batch), next to the bare primitives a
v1 message costs (the floor), with ratios.

    .venv/bin/python bench/pairwise_micro.py [--messages 20000] [--size 256] [--repeat 3] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from gateway.protocol.message import InnerMessage, Kind, new_message_id
from gateway.protocol.pairwise import PairwiseSession
from gateway.protocol.pairwise.crypto import Verifier, aead_decrypt, aead_encrypt, kdf_ck
from gateway.protocol.pairwise.testing import ToyAuthority, ToyDevice


def rate(n: int, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--batch", type=int, default=256, help="messages per v2 batch")
    args = parser.parse_args()
    n, payload = args.messages, os.urandom(args.size)

    authority = ToyAuthority()
    alice, bob = ToyDevice.make(authority, "dev-a"), ToyDevice.make(authority, "dev-b")
    bundle = bob.prekeys.bundle(device_id=bob.device_id, credential=bob.credential, signer=bob.signer)
    a = PairwiseSession.initiate(local_device_id=alice.device_id, credential=alice.credential, signer=alice.signer,
                                 bundle=bundle, verify_credential=authority.verify_credential)
    b, _ = PairwiseSession.accept(a.encrypt(b"hello"), local_device_id=bob.device_id, signer=bob.signer,
                                  prekeys=bob.prekeys, verify_credential=authority.verify_credential)
    a.decrypt(b.encrypt(b"hi"))

    inner = InnerMessage(Kind.DATA, new_message_id(), "planner", "camera", 0, 86_400_000, payload=payload,
                         response_topic="agw/planner/in", correlation_data=b"c" * 16)
    # The floor: one HMAC chain step, one AEAD and one Ed25519 operation per message, nothing else.
    ck, key, nonce, signer = os.urandom(32), os.urandom(32), os.urandom(24), alice.signer
    ct = aead_encrypt(key, nonce, payload, b"h" * 80)
    sig = signer.sign(ct)
    verifier = Verifier(signer.verify_key)

    def floor_send() -> None:
        for _ in range(n):
            kdf_ck(ck)
            signer.sign(aead_encrypt(key, nonce, payload, b"h" * 80))

    def floor_recv() -> None:
        for _ in range(n):
            verifier.verify(ct, sig, "bench")
            kdf_ck(ck)
            aead_decrypt(key, nonce, ct, b"h" * 80)

    encrypt_rate = decrypt_rate = full_send = full_recv = send_floor = recv_floor = 0.0
    batch_send = batch_recv = 0.0
    wires: list[bytes] = []
    full: list[bytes] = []
    batches: list[bytes] = []
    per = args.batch

    def send_batches() -> None:
        batches.clear()
        batches.extend(a.encrypt_batch([payload] * per) for _ in range(n // per))

    for _ in range(args.repeat):  # best of N, all measurements interleaved: the box is shared
        batch_send = max(batch_send, rate(n // per * per, send_batches))
        batch_recv = max(batch_recv, rate(n // per * per, lambda: [b.decrypt_batch(w) for w in batches]))
        wires.clear()
        encrypt_rate = max(encrypt_rate, rate(n, lambda: wires.extend(a.encrypt(payload) for _ in range(n))))
        send_floor = max(send_floor, rate(n, floor_send))
        decrypt_rate = max(decrypt_rate, rate(n, lambda: [b.decrypt(w) for w in wires]))
        recv_floor = max(recv_floor, rate(n, floor_recv))
        full.clear()
        full_send = max(full_send, rate(n, lambda: full.extend(a.encrypt(inner.encode()) for _ in range(n))))
        full_recv = max(full_recv, rate(n, lambda: [InnerMessage.decode(b.decrypt(w)) for w in full]))

    overhead = len(wires[0]) - len(payload)

    print(f"pairwise micro-benchmark: {n} messages of {len(payload)} B, one core, wire overhead {overhead} B")
    print(f"{'operation':42} {'msg/s':>10} {'vs floor':>9}")
    rows = [
        ("encrypt+sign (session)", encrypt_rate, send_floor),
        ("verify+decrypt (session)", decrypt_rate, recv_floor),
        ("inner encode + encrypt+sign", full_send, send_floor),
        ("verify+decrypt + inner decode", full_recv, recv_floor),
        (f"v2 batches of {per}: encrypt, sign once", batch_send, send_floor),
        (f"v2 batches of {per}: verify once, decrypt", batch_recv, recv_floor),
        ("floor: HMAC step + AEAD + Ed25519 sign", send_floor, send_floor),
        ("floor: Ed25519 verify + HMAC step + AEAD", recv_floor, recv_floor),
    ]
    for name, r, floor in rows:
        print(f"{name:42} {r:10.0f} {r / floor:9.2f}")
    print(f"end to end (one core each side, limited by the slower): {min(encrypt_rate, decrypt_rate):.0f} msg/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
