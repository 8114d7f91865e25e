"""What the parts of a running gateway share: its clock and its counters (shown by `agw status`)."""

from __future__ import annotations

import time
from dataclasses import dataclass


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Counters:
    sent: int = 0
    delivered: int = 0
    acked: int = 0
    duplicates: int = 0
    rejected_in: int = 0
    bad_input: int = 0
