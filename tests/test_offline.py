"""Data never leave the hospital: the whole demo runs with every outbound connection refused.

A socket guard in this process refuses (and records) any connection or name look-up
whose destination is not loopback or a unix socket; the three-feed demo must still
publish, and nothing may even have tried to reach out (no analytics, no version check).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from etl.demo import run_demo

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _local_host(host: Any) -> bool:
    """A loopback address or a local name (bytes or str)."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host is None or host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # another name: refused


def _is_local(address: Any) -> bool:
    """A connect() destination: a unix socket path, or (host, port, ...) on loopback."""
    if isinstance(address, (str, bytes)):
        return True
    return _local_host(address[0])


class Guard:
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str, address: Any) -> None:
        self.attempts.append(f"{what} {address!r}")
        raise OSError(f"outbound network blocked by the test: {what} {address!r}")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Guard:
    guard = Guard()
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    getaddrinfo, create_connection = socket.getaddrinfo, socket.create_connection

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX and not _is_local(address):
            guard.refuse("connect", address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family != socket.AF_UNIX and not _is_local(address):
            guard.refuse("connect_ex", address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _local_host(host):
            guard.refuse("getaddrinfo", host)
        return getaddrinfo(host, *args, **kwargs)

    def guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_local(address):
            guard.refuse("create_connection", address)
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    return guard


def test_the_guard_refuses_the_outside_and_lets_loopback_through(offline: Guard) -> None:
    with pytest.raises(OSError, match="blocked"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1
    with pytest.raises(OSError, match="blocked"):
        socket.getaddrinfo("pypi.org", 443)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()
    assert len(offline.attempts) == 2
    offline.attempts.clear()


def test_the_demo_publishes_with_outbound_network_blocked(offline: Guard, tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    assert result.status == "published", result.report["errors"]
    assert offline.attempts == []  # nothing tried to leave: no analytics, no version check
    report = json.loads((result.run_dir / "report.json").read_text(encoding="utf-8"))
    assert set(report["feeds"]) == {"ehr", "lab", "pacs"}
    for feed in report["feeds"].values():
        assert feed["records_in"] == feed["loaded"] + feed["quarantined"] + feed["filtered"] > 0
    # Great Expectations ran (its checks are in the report) and built its Data Docs offline
    assert any(c.get("engine") == "great_expectations" for c in report["checks"])
    assert (result.run_dir / report["data_docs"]).is_file()
