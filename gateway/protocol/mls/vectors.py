"""Run an official passive-client scenario file: `python -m gateway.protocol.mls.vectors FILE.json`.

Each entry (mlswg/mls-implementations `test-vectors.md`, "Passive Client Scenarios") gives a KeyPackage with
its private keys, a Welcome, optionally an out-of-band ratchet tree and external PSKs, then epochs of proposals
and a commit, each with the epoch authenticator the client must reach. An entry passes when the client joins
and follows every epoch with matching authenticators. Entries for cipher suites we do not implement are
counted apart as skipped. The last line printed is `N passed, M failed`; the exit status is 1 if any failed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.protocol.mls.crypto import SUITES, Ed25519Signer, get_suite
from gateway.protocol.mls.errors import MlsError
from gateway.protocol.mls.framing import MLSMessage
from gateway.protocol.mls.group import Group, GroupConfig
from gateway.protocol.mls.group_state import StagedCommit
from gateway.protocol.mls.key_package import KeyPackage
from gateway.protocol.mls.key_package_bundle import KeyPackageBundle
from gateway.protocol.mls.ratchet_tree import RatchetTree
from gateway.protocol.mls.welcome_structs import Welcome


class VectorMismatch(AssertionError):
    """The client computed something other than the vector expects."""


@dataclass(frozen=True)
class EntryResult:
    index: int
    cipher_suite: int
    passed: bool
    detail: str


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def run_passive_client(entry: dict[str, Any]) -> None:
    """Run one scenario; raises VectorMismatch or MlsError on the first disagreement."""
    cs = get_suite(int(entry["cipher_suite"]))
    kp_msg = MLSMessage.from_bytes(_h(entry["key_package"]))
    if not isinstance(kp_msg.body, KeyPackage):
        raise VectorMismatch("key_package is not an MLSMessage holding a KeyPackage")
    kp = kp_msg.body
    signer = Ed25519Signer.from_seed(_h(entry["signature_priv"]))
    if signer.public_key != kp.leaf_node.signature_key:
        raise VectorMismatch("signature_priv does not match the KeyPackage signature key")
    if cs.hpke_public_key(_h(entry["encryption_priv"])) != kp.leaf_node.encryption_key:
        raise VectorMismatch("encryption_priv does not match the KeyPackage leaf encryption key")
    if cs.hpke_public_key(_h(entry["init_priv"])) != kp.init_key:
        raise VectorMismatch("init_priv does not match the KeyPackage init key")
    config = GroupConfig(external_psks={_h(p["psk_id"]): _h(p["psk"]) for p in entry.get("external_psks", [])})
    welcome_msg = MLSMessage.from_bytes(_h(entry["welcome"]))
    if not isinstance(welcome_msg.body, Welcome):
        raise VectorMismatch("welcome is not an MLSMessage holding a Welcome")
    tree = RatchetTree.from_wire(_h(entry["ratchet_tree"])) if entry.get("ratchet_tree") else None
    bundle = KeyPackageBundle(kp, _h(entry["init_priv"]), _h(entry["encryption_priv"]))
    group = Group.join(welcome_msg.body, bundle, signer, ratchet_tree=tree, config=config)
    if group.epoch_authenticator != _h(entry["initial_epoch_authenticator"]):
        raise VectorMismatch("epoch authenticator after joining differs")
    for n, epoch in enumerate(entry["epochs"]):
        for p in epoch["proposals"]:
            group.process(_h(p))
        staged = group.process(_h(epoch["commit"]))
        if not isinstance(staged, StagedCommit):
            raise VectorMismatch(f"epoch {n}: the commit message did not yield a commit")
        group.merge_staged_commit(staged)
        if group.epoch_authenticator != _h(epoch["epoch_authenticator"]):
            raise VectorMismatch(f"epoch {n}: epoch authenticator differs")


def run_file(path: Path) -> tuple[list[EntryResult], int]:
    """Results for the supported entries, and the number of entries skipped (unsupported cipher suite)."""
    entries = json.loads(path.read_text())
    results: list[EntryResult] = []
    skipped = 0
    for i, entry in enumerate(entries):
        suite = int(entry["cipher_suite"])
        if suite not in SUITES:
            skipped += 1
            continue
        try:
            run_passive_client(entry)
        except (MlsError, VectorMismatch) as e:
            results.append(EntryResult(i, suite, False, f"{type(e).__name__}: {e}"))
        except Exception as e:  # an unexpected error is a failed entry too (and a bug to fix), not a crash
            results.append(EntryResult(i, suite, False, f"unexpected {type(e).__name__}: {e}"))
        else:
            results.append(EntryResult(i, suite, True, "ok"))
    return results, skipped


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gateway.protocol.mls.vectors FILE.json", file=sys.stderr)
        return 2
    results, skipped = run_file(Path(args[0]))
    for r in results:
        if not r.passed:
            print(f"entry {r.index} (suite {r.cipher_suite}): FAILED {r.detail}")
    if skipped:
        print(f"{skipped} entries skipped (cipher suites other than {sorted(SUITES)})", file=sys.stderr)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
