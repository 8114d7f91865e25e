"""MLS timings the MLS issue asks for, with `gateway.protocol.mls.group.Group` (suite 1):
create a group, add N-1 members in one commit, process a commit with path at N members, protect + unprotect
a 1 KiB application message. Pure computation in this process; no I/O.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from gateway.protocol.mls import crypto
from gateway.protocol.mls.credentials import Credential
from gateway.protocol.mls.group import Group
from gateway.protocol.mls.group_state import ApplicationMessage, StagedCommit
from gateway.protocol.mls.key_package_bundle import create_key_package


def measure(members: int = 1000, messages: int = 200) -> dict[str, Any]:
    cs = crypto.get_suite(1)
    creator = crypto.Ed25519Signer.generate()
    t = time.perf_counter()
    a = Group.create(1, b"bench group", creator, Credential.basic(b"creator"))
    create_ms = (time.perf_counter() - t) * 1e3
    joiners = []
    for i in range(members - 1):
        signer = crypto.Ed25519Signer.generate()
        joiners.append((signer, create_key_package(cs, signer, Credential.basic(b"member-%d" % i))))
    t = time.perf_counter()
    pending = a.commit(add=[bundle.key_package for _, bundle in joiners])
    a.merge_pending_commit(pending)
    add_s = time.perf_counter() - t
    assert pending.welcome is not None and len(a.members()) == members
    signer, bundle = joiners[len(joiners) // 2]
    t = time.perf_counter()
    b = Group.join(pending.welcome.body, bundle, signer)  # type: ignore[arg-type]
    join_ms = (time.perf_counter() - t) * 1e3
    path_commit = a.commit()
    a.merge_pending_commit(path_commit)
    wire = path_commit.message.to_bytes()
    t = time.perf_counter()
    staged = b.process(wire)
    assert isinstance(staged, StagedCommit)
    b.merge_staged_commit(staged)
    process_ms = (time.perf_counter() - t) * 1e3
    if b.epoch_authenticator != a.epoch_authenticator:
        raise RuntimeError("MLS members disagree after the commit")
    data = b"x" * 1024
    samples = []
    for _ in range(messages):
        t = time.perf_counter()
        got = a.process(b.encrypt_application(data).to_bytes())
        samples.append((time.perf_counter() - t) * 1e6)
        if not isinstance(got, ApplicationMessage) or got.data != data:
            raise RuntimeError("MLS application message did not round-trip")
    return {"members": members, "create_ms": round(create_ms, 2), "add_commit_s": round(add_s, 3),
            "join_from_welcome_ms": round(join_ms, 1), "process_commit_ms": round(process_ms, 2),
            "protect_unprotect_1k_us": round(statistics.median(samples), 1)}


if __name__ == "__main__":
    import json
    import sys

    print("RESULT " + json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)), flush=True)
