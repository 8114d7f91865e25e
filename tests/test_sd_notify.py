"""gateway/sd_notify.py against a datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import socket
from pathlib import Path

from gateway.sd_notify import Notifier


def test_extend_timeout_sends_what_systemd_reads(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        assert n.extend_timeout(3600, "upgrading the store schema 3 -> 4")
        assert manager.recv(4096) == b"EXTEND_TIMEOUT_USEC=3600000000\nSTATUS=upgrading the store schema 3 -> 4"
        assert n.extend_timeout(1.5)
        assert manager.recv(4096) == b"EXTEND_TIMEOUT_USEC=1500000"


def test_without_systemd_nothing_is_sent() -> None:
    assert not Notifier({}).extend_timeout(60)
