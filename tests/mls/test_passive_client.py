"""passive-client-welcome.json and passive-client-handling-commit.json, suites 1 and 3, through the same entry
point as `python -m gateway.protocol.mls.vectors FILE`.

Format per entry: cipher_suite, key_package (MLSMessage) with signature_priv / encryption_priv / init_priv,
welcome (MLSMessage), ratchet_tree (null when the Welcome carries it), external_psks[{psk_id, psk}],
initial_epoch_authenticator, epochs[{proposals[MLSMessage], commit (MLSMessage), epoch_authenticator}].
Checks: the private keys match the KeyPackage; the client joins and reaches the initial epoch authenticator;
it then processes every epoch's proposals and commit and reaches each epoch authenticator.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocol.mls.vectors import main, run_passive_client

from .conftest import VECTORS_DIR, vector_params


@pytest.mark.parametrize("v", vector_params("passive-client-welcome.json"))
def test_passive_client_welcome(v: dict[str, Any]) -> None:
    run_passive_client(v)


@pytest.mark.parametrize("v", vector_params("passive-client-handling-commit.json"))
def test_passive_client_handling_commit(v: dict[str, Any]) -> None:
    assert v["epochs"], "handling-commit scenarios have epochs to follow"
    run_passive_client(v)


def test_cli_reports_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(VECTORS_DIR / "passive-client-welcome.json")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "16 passed, 0 failed"


def test_cli_counts_a_failure(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    entries = json.loads((VECTORS_DIR / "passive-client-welcome.json").read_text())
    entry = next(e for e in entries if e["cipher_suite"] == 1)
    bad = dict(entry, initial_epoch_authenticator="00" * 32)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([entry, bad]))
    assert main([str(f)]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "1 passed, 1 failed"
