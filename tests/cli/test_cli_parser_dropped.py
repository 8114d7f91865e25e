"""`agw run` runs the daemon inside `gateway.cli.main`: the argument parser (every subcommand's, ~180 KiB of
objects) must not stay referenced from there for the daemon's life (issue 7, resident memory)."""

from __future__ import annotations

import argparse
import gc
import weakref

import pytest

from gateway import cli


def test_the_parser_is_gone_while_the_command_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[weakref.ref[argparse.ArgumentParser]] = []
    seen: list[tuple[bool, str]] = []
    real = cli.build_parser

    def build() -> argparse.ArgumentParser:
        p = real()
        built.append(weakref.ref(p))
        return p

    def run(args: argparse.Namespace) -> int:
        gc.collect()
        seen.append((built[0]() is None, args.config))
        return 7

    monkeypatch.setattr(cli, "build_parser", build)
    monkeypatch.setattr(cli, "cmd_run", run)
    assert cli.main(["run", "--config", "/etc/agw/agw.yaml"]) == 7
    assert seen == [(True, "/etc/agw/agw.yaml")]
