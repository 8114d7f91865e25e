"""Per-stage timestamps of messages through the gateway, for the round-trip benchmark (bench/stages.py) only.

Off unless `AGW_STAGE_TRACE` names a file: then each `mark(stage, ids)` appends `<time_ns> <stage> <id hex>`
lines to it (wall clock, so the two gateways of a bench on one machine can be compared). Nothing of it travels
in a message; only the random message ids and the stage names are written, never content or keys. When off,
`mark` is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TextIO

_PATH = os.environ.get("AGW_STAGE_TRACE")
_out: TextIO | None = None


def _mark(stage: str, ids: Iterable[bytes], at_ns: int | None = None) -> None:
    global _out
    if _out is None:
        _out = open(_PATH or os.devnull, "a", buffering=1)
    t = time.time_ns() if at_ns is None else at_ns
    _out.write("".join(f"{t} {stage} {i.hex()}\n" for i in ids))


def _off(stage: str, ids: Iterable[bytes], at_ns: int | None = None) -> None:
    return None


enabled = bool(_PATH)
mark = _mark if enabled else _off
