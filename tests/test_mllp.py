"""The MLLP listener as a real process: durable spool, ACK only after the write, a kill
-9 and a restart with senders resending, a frame cut by a disconnect, SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from etl.config import FeedConfig
from etl.sources.ehr import Extract
from etl.sources.hl7v2 import extract_hl7
from etl.sources.mllp import Spool, _frames, ack, spool_name
from tests.conftest import REPO, TEST_KEY

CLI = REPO / ".venv" / "bin" / "omop-etl"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def message(cid: str) -> bytes:
    return (
        f"MSH|^~\\&|LAB|H|ETL|S|20240301101500||ORU^R01^ORU_R01|{cid}|P|2.5.1\r"
        f"PID|1||MRN{cid}^^^H^MR\rOBR|1||O{cid}|24323-8^Panel^LN\r"
        f"OBX|1|NM|2339-0^Glucose^LN||95|mg/dL|||||F|||20240301093000\r"
    ).encode()


class Listener:
    """`omop-etl lab listen` in a subprocess on a free port."""

    def __init__(self, spool: Path):
        self.proc = subprocess.Popen(
            [str(CLI), "lab", "listen", "--port", "0", "--spool", str(spool)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:  # logs may come first (they go to stdout too)
            lines.append(line)
            if line.startswith("listening on "):
                break
        if not (lines and lines[-1].startswith("listening on ")):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"listener did not start: {lines}")
        self.port = int(lines[-1].rsplit(":", 1)[1])
        # keep draining the output so the listener never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


def read_frame(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(FS + CR):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def send(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(VT + payload + FS + CR)
        return read_frame(s)


def spooled(spool: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in spool.iterdir()}


def test_frames_names_and_acks(tmp_path: Path) -> None:
    buf = bytearray(b"noise" + VT + b"one" + FS + CR + VT + b"tw")
    assert _frames(buf) == [b"one"] and bytes(buf) == VT + b"tw"
    assert spool_name(message("A/1 x")).startswith("A_1_x-")
    assert spool_name(message("A1")) == spool_name(message("A1"))
    assert spool_name(b"PID|1").startswith("no-control-id-")
    reply = ack(message("C9"), "AA").decode()
    assert reply.split("\r")[1] == "MSA|AA|C9"
    assert reply.startswith("MSH|^~\\&|ETL|S|LAB|H|") and "|ACK^R01|" in reply
    spool = Spool(tmp_path)
    (tmp_path / ".tmp-leftover").write_bytes(b"x")
    path = spool.write(message("C9"))
    assert path.read_bytes() == message("C9")
    assert Spool(tmp_path) and sorted(spooled(tmp_path)) == [path.name]  # leftovers removed


def test_kill_9_and_restart_every_acknowledged_message_spooled_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ids = [f"M{i:04d}" for i in range(1000)]
    clients = 5
    state = {"listener": Listener(spool)}
    acked: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(mine: list[str]) -> None:
        sock: socket.socket | None = None
        i, deadline = 0, time.monotonic() + 60
        try:
            while i < len(mine) and time.monotonic() < deadline:
                try:
                    if sock is None:
                        sock = socket.create_connection(
                            ("127.0.0.1", state["listener"].port), timeout=5
                        )
                    sock.sendall(VT + message(mine[i]) + FS + CR)
                    reply = read_frame(sock)
                except OSError:  # killed listener: reconnect and resend the unacked one
                    if sock is not None:
                        sock.close()
                    sock = None
                    time.sleep(0.02)
                    continue
                assert f"\rMSA|AA|{mine[i]}\r".encode() in reply, reply
                with lock:
                    acked.append(mine[i])
                i += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            if sock is not None:
                sock.close()

    threads = [threading.Thread(target=client, args=(ids[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    while len(acked) < 300 and all(t.is_alive() for t in threads):
        time.sleep(0.005)
    state["listener"].stop(signal.SIGKILL)
    killed_at = len(acked)
    state["listener"] = Listener(spool)
    try:
        for t in threads:
            t.join(timeout=90)
        assert not errors, errors[0]
        assert 300 <= killed_at < 1000
        assert sorted(acked) == ids
        assert state["listener"].stop() == 0
    finally:  # never leave a listener behind
        if state["listener"].proc.poll() is None:
            state["listener"].stop(signal.SIGKILL)
    files = spooled(spool)
    by_id: dict[str, list[bytes]] = {}
    for name, data in files.items():
        by_id.setdefault(name.split("-", 1)[0], []).append(data)
    # every acknowledged message exactly once, byte for byte; no temporary file left
    assert sorted(by_id) == ids
    assert all(by_id[i] == [message(i)] for i in ids)
    assert not [n for n in files if n.startswith(".")]


def test_mid_frame_disconnect_non_hl7_and_sigterm(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    listener = Listener(spool)
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as s:
            s.sendall(VT + message("CUT")[:40])  # the sender goes away mid-frame
        reply = send(listener.port, b"hello, not HL7")
        assert b"\rMSA|AR||" in reply
        assert b"\rMSA|AA|OK1\r" in send(listener.port, message("OK1"))
        idle = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
        idle.sendall(VT + message("HALF")[:30])
    finally:
        code = listener.stop(signal.SIGTERM)
    assert code == 0
    # the listener closed the idle connection (its partial frame unread: maybe a reset)
    with contextlib.suppress(ConnectionResetError):
        assert idle.recv(10) == b""
    idle.close()
    assert [n.split("-")[0] for n in spooled(spool)] == ["OK1"]
    # the spool is an hl7v2 feed folder
    sink = Extract()
    feed = FeedConfig(name="lab", kind="hl7v2", path=spool)
    (stats,) = extract_hl7(feed, TEST_KEY.encode(), sink)
    assert (stats.records_in, stats.extracted) == (1, 1)
    assert sink.table("event").column("code").to_pylist() == ["2339-0"]
    with pytest.raises(OSError):
        send(listener.port, message("LATE"))


def test_write_failure_is_answered_ae(tmp_path: Path) -> None:
    """In process: the spool folder disappears under the listener -> AE, nothing acked."""
    import asyncio
    import shutil

    from etl.sources.mllp import Listener as MllpListener

    async def scenario() -> bytes:
        listener = MllpListener(Spool(tmp_path / "spool"), port=0)
        port = await listener.start()
        shutil.rmtree(tmp_path / "spool")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(VT + message("E1") + FS + CR)
        reply = await reader.readuntil(FS + CR)
        writer.close()
        await listener.stop()
        return reply

    reply = asyncio.run(scenario())
    assert b"\rMSA|AE|E1|write failed" in reply
