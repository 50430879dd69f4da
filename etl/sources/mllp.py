"""MLLP listener: receives HL7 v2 messages over TCP and spools them for the nightly run.

Each frame (<VT> message <FS><CR>) is written to the spool folder as a temporary file,
fsynced, renamed atomically to its final name and the folder fsynced; only then is the
message acknowledged (MSA AA). A frame without an MSH gets AR, a failed write AE; a frame
cut by a disconnect is discarded (nothing written, nothing acknowledged, so the sender
resends it). The final name is the message's control id (MSH-10) plus a digest of its
bytes: a sender resending an unacknowledged message replaces the earlier copy instead of
adding a second one. The nightly run reads the spool as an hl7v2 feed folder (hidden
temporary files are skipped there, and removed when the listener starts).

SIGTERM or SIGINT: stop accepting connections, finish the messages being written and
acknowledged, then exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import re
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
MAX_FRAME = 64 * 1024 * 1024  # a larger frame closes the connection (AR)
TMP_PREFIX = ".tmp-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def spool_name(message: bytes) -> str:
    """`<MSH-10 sanitised>-<digest of the bytes>.hl7`: a resend maps to the same name."""
    fields = _msh_fields(message)
    control = fields[9] if len(fields) > 9 else ""
    safe = _UNSAFE.sub("_", control.strip())[:64].strip("._") or "no-control-id"
    return f"{safe}-{hashlib.sha256(message).hexdigest()[:16]}.hl7"


def _msh(message: bytes) -> tuple[str, list[str]]:
    """(field separator, MSH fields as text: MSH-n at index n-1); ('|', []) without MSH."""
    text = message.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r")
    for seg in text.split("\r"):
        seg = seg.lstrip("\ufeff \t")
        if seg.startswith("MSH") and len(seg) > 3:
            return seg[3], seg.split(seg[3])
    return "|", []


def _msh_fields(message: bytes) -> list[str]:
    return _msh(message)[1]


def ack(message: bytes, code: str, text: str = "") -> bytes:
    """An ACK for `message`: MSA-1 `code` (AA, AE, AR), MSA-2 its control id."""
    sep, f = _msh(message)

    def get(n: int) -> str:
        return f[n - 1] if len(f) >= n else ""

    enc = get(2) or "^~\\&"
    comp = enc[0] if enc else "^"
    trigger = get(9).split(comp)[1] if comp in get(9) else ""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    msh = sep.join(
        [
            "MSH",
            enc,
            get(5),
            get(6),
            get(3),
            get(4),
            now,
            "",
            f"ACK{comp}{trigger}" if trigger else "ACK",
            uuid.uuid4().hex[:20],
            get(11) or "P",
            get(12).split(comp)[0] or "2.5.1",
        ]
    )
    reason = _UNSAFE.sub(" ", text)[:80].strip() if text else ""
    msa = sep.join(["MSA", code, get(10)] + ([reason] if reason else []))
    return (msh + "\r" + msa + "\r").encode("utf-8")


class Spool:
    """A folder where each received message becomes one durable file."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(TMP_PREFIX + "*"):  # never acknowledged: the sender resends
            tmp.unlink(missing_ok=True)

    def write(self, message: bytes) -> Path:
        """Write, fsync, rename atomically, fsync the folder; the final path."""
        final = self.dir / spool_name(message)
        tmp = self.dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(message)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return final


@dataclass
class _Connection:
    task: asyncio.Task
    busy: bool = False


@dataclass
class Listener:
    """The MLLP server; `serve()` runs until `stop()` (or SIGTERM with `run`)."""

    spool: Spool
    host: str = "127.0.0.1"
    port: int = 2575
    received: int = 0
    _connections: dict[int, _Connection] = field(default_factory=dict)
    _server: asyncio.Server | None = None
    _stopping: bool = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("MLLP listener on %s:%d, spool %s", self.host, self.port, self.spool.dir)
        return self.port

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let messages being written finish, close every connection."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            if not conn.busy:
                conn.task.cancel()
        pending = [c.task for c in self._connections.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for t in late:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        log.info("MLLP listener stopped; %d message(s) received", self.received)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(task)
        self._connections[id(conn)] = conn
        peer = writer.get_extra_info("peername")
        buf = bytearray()
        try:
            while not self._stopping:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                for payload in _frames(buf):
                    conn.busy = True
                    try:
                        try:
                            reply = await self._message(payload)
                        except Exception as exc:  # never drop a connection without a reply
                            log.exception("message not handled")
                            reply = ack(payload, "AE", f"{type(exc).__name__}")
                        writer.write(VT + reply + FS + CR)
                        await writer.drain()
                    finally:
                        conn.busy = False
                    if self._stopping:
                        break
                if len(buf) > MAX_FRAME:
                    writer.write(VT + ack(b"", "AR", "frame too large") + FS + CR)
                    await writer.drain()
                    break
            if buf.strip(b"\r\n\t "):
                log.warning("%s: connection closed inside a frame; partial frame discarded", peer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.warning("%s: connection lost (%s); partial frame discarded", peer, exc)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.pop(id(conn), None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _message(self, payload: bytes) -> bytes:
        if not _msh_fields(payload):
            log.warning("frame without an MSH segment rejected (%d bytes)", len(payload))
            return ack(payload, "AR", "not an HL7 message: no MSH segment")
        try:
            await asyncio.to_thread(self.spool.write, payload)
        except OSError as exc:
            log.error("spool write failed: %s", exc)
            return ack(payload, "AE", f"write failed: {exc.strerror or exc}")
        self.received += 1
        return ack(payload, "AA")


def _frames(buf: bytearray) -> list[bytes]:
    """Complete frames taken out of `buf` (what precedes a <VT> is noise and dropped)."""
    out = []
    while True:
        start = buf.find(VT)
        if start < 0:
            buf.clear()
            return out
        end = buf.find(FS + CR, start + 1)
        if end < 0:
            del buf[:start]
            return out
        out.append(bytes(buf[start + 1 : end]))
        del buf[: end + 2]


async def run(spool_dir: Path, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT."""
    listener = Listener(Spool(spool_dir), host, port)
    await listener.start()
    print(f"listening on {listener.host}:{listener.port}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    if ready is not None:
        ready.set()
    await done.wait()
    await listener.stop()
