"""Run as a separate process with a device's token (SOFTHSM2_CONF): look inside copies of its store.

    python -m tests.torture.store_probe <config> <peer> <old-store-dir> <new-store-dir> <wire-hex>...

For each captured wire (a message, or a v2 batch of messages, the device received after the old copy was taken;
one entry per message), the message key is
computed from the old copy's session state; the new copy (taken after ratchet steps) must neither hold that key
in its decrypted session records nor decrypt the wire. Prints JSON; the test decides.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import hsm
from gateway.config import load_config
from gateway.protocol.errors import ProtocolError
from gateway.protocol.pairwise import PairwiseBatch, PairwiseMessage, PairwiseSession
from gateway.protocol.pairwise.crypto import Ed25519Signer
from gateway.store import Store


def _sessions(store_dir: Path, key: object, peer: str) -> tuple[bytes, list[PairwiseSession]]:
    store = Store.open(store_dir / "agw.db", key)  # type: ignore[arg-type]
    try:
        raw = store.sessions.get(peer) or b""
    finally:
        store.close()
    signer = Ed25519Signer.generate()
    out, pos = [], 0
    while pos < len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        out.append(PairwiseSession.decode(raw[pos + 4:pos + 4 + n], signer=signer))
        pos += 4 + n
    return raw, out


def main() -> None:
    config, peer, old_dir, new_dir, *wires_hex = sys.argv[1:]
    cfg = load_config(config)
    key = hsm.load_storage_key(cfg.keys.storage)
    _, old = _sessions(Path(old_dir), key, peer)
    new_raw, new = _sessions(Path(new_dir), key, peer)
    result: dict[str, object] = {"old_sessions": len(old), "new_sessions": len(new), "keys": []}
    keys: list[dict[str, object]] = []
    for wh in wires_hex:
        wire = bytes.fromhex(wh)
        # A v2 batch carries several messages under one signature: one entry per message.
        if PairwiseBatch.is_batch(wire):
            headers = [item.header for item in PairwiseBatch.parse(wire).items]
        else:
            headers = [PairwiseMessage.parse(wire).header]
        decrypted_by_new = [False] * len(headers)
        for s in new:
            try:
                if PairwiseBatch.is_batch(wire):
                    for i, r in enumerate(s.decrypt_batch(wire)):
                        decrypted_by_new[i] |= isinstance(r, bytes)
                else:
                    s.decrypt(wire)
                    decrypted_by_new[0] = True
            except ProtocolError:
                pass
        for i, h in enumerate(headers):
            mk = None
            for s in old:
                try:
                    probe = PairwiseSession.decode(s.encode(), signer=Ed25519Signer.generate())
                    mk = probe.ratchet.prepare_receive(h.dh_public, h.previous_chain_length,
                                                       h.message_number).message_key
                    break
                except (ProtocolError, AttributeError, ValueError):
                    continue
            keys.append({"key": mk.hex() if mk else None,
                         "in_new_store": bool(mk) and mk in new_raw,  # type: ignore[operator]
                         "held_by_new": bool(mk) and any(s.ratchet.holds_message_key(mk) for s in new),  # type: ignore[arg-type]
                         "decrypted_by_new": decrypted_by_new[i]})
    result["keys"] = keys
    print(json.dumps(result))


if __name__ == "__main__":
    main()
