"""One thread for every PKCS#11 call in the process.

SoftHSM2 driven through python-pkcs11 crashes when two threads use two sessions at once, and many real tokens
are not much better. Rather than trust each module's locking, every call into PKCS#11 is run on a single worker
thread. A call made from the worker itself runs inline, so backend code may nest calls freely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_worker_ident: int | None = None


def _mark_worker() -> None:
    global _worker_ident
    _worker_ident = threading.get_ident()


def run(fn: Callable[[], T]) -> T:
    """Run `fn` on the PKCS#11 worker thread and return its result (or raise its exception)."""
    global _executor
    if threading.get_ident() == _worker_ident:
        return fn()
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11",
                                           initializer=_mark_worker)
        executor = _executor
    return executor.submit(fn).result()


def worker_thread_id() -> int | None:
    """The worker's thread id once it has started (tests use it to show calls are serialised)."""
    return _worker_ident
