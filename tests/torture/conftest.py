"""Shared settings of the torture suite: short by default (it runs in `make test`), long with AGW_TORTURE=long.

Every scenario records its figures (messages sent, delivered, duplicated, lost; inputs fuzzed; crashes) with
`record()`. They are printed at the end of the run and written as JSON to $AGW_TORTURE_FIGURES (default
/tmp/agw-torture-figures.json), which is where docs/reliability.md takes its numbers from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

LONG = os.environ.get("AGW_TORTURE", "").lower() == "long"
FIGURES_FILE = Path(os.environ.get("AGW_TORTURE_FIGURES", "/tmp/agw-torture-figures.json"))
_FIGURES: dict[str, dict[str, Any]] = {}


def record(scenario: str, **figures: Any) -> None:
    """Remember the figures of one scenario for the end-of-run summary (merged into the JSON file)."""
    _FIGURES.setdefault(scenario, {}).update(figures)
    try:
        old = json.loads(FIGURES_FILE.read_text())
    except (OSError, ValueError):
        old = {}
    mode = "long" if LONG else "short"
    old.setdefault(mode, {})[scenario] = _FIGURES[scenario]
    FIGURES_FILE.write_text(json.dumps(old, indent=1, sort_keys=True))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section(f"torture figures ({'long' if LONG else 'short'} configuration)")
    for name in sorted(_FIGURES):
        terminalreporter.write_line(f"{name}: {json.dumps(_FIGURES[name], sort_keys=True)}")
