"""Where the time goes in a gateway: summarise the cProfile output of an `agw run` process that ran under
`bench/profiled_gateway.py` (see `bench.paths.start_profiled`). The profile is CPU time of the event-loop thread
(`time.thread_time`), start-up included; waiting in epoll is not in it, nor are the paho network thread and
`asyncio.to_thread` workers, which the report says."""

from __future__ import annotations

import io
import pstats
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parents[1])


def _where(key: tuple[str, int, str]) -> str:
    filename, line, func = key
    if filename.startswith(ROOT):
        filename = filename[len(ROOT) + 1:]
    elif "site-packages/" in filename:
        filename = filename.split("site-packages/", 1)[1]
    elif filename == "~":
        return func
    else:
        filename = Path(filename).name
    return f"{filename}:{line}({func})"


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Top entries by own time and by cumulative time (project code only for the latter)."""
    st = pstats.Stats(str(path), stream=io.StringIO())
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = st.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    own = [{"where": _where(k), "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
           for k, (_, nc, tt, ct, _) in rows[:top]]
    mine = [(k, v) for k, v in stats.items() if k[0].startswith(ROOT + "/gateway/")]
    mine.sort(key=lambda kv: kv[1][3], reverse=True)
    cum = [{"where": _where(k), "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
           for k, (_, nc, tt, ct, _) in mine[:top]]
    return {"file": str(path), "cpu_s": round(total, 3),
            "top_own_time": own, "top_cumulative_gateway": cum}
