"""Split an HL7 v2 file into messages: line ends, byte-order mark, batch envelopes, charset.

Works on bytes first (CR, LF and CRLF are the same in every charset HL7 allows), so a
message in another encoding does not spoil its neighbours. FHS/BHS/BTS/FTS batch segments
are envelope, not content, and are dropped. Lines before the first MSH form a chunk of
their own, which parsing rejects ("no MSH segment").
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")
BOM = codecs.BOM_UTF8
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# MSH-18 character set names (HL7 table 0211) and the Python codec that reads them
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


@dataclass
class RawMessage:
    """One message (or one chunk without MSH) of a file, decoded."""

    number: int  # 1-based position in the file
    text: str  # segments joined with CR
    note: str | None = None  # e.g. decoded as latin-1
    error: str | None = None  # cannot be read at all (NUL bytes, no MSH)

    @property
    def segments(self) -> list[str]:
        """Its segments (split when asked: the bulk reader needs only the text)."""
        return self.text.split("\r")

    @property
    def record_count(self) -> int:
        """The records this message holds: its OBX (results) and SPM (specimens)."""
        return sum(1 for s in self.segments if s[:3] in ("OBX", "SPM"))


# What only the general framing handles, at a segment's start: whitespace (a segment that
# starts with it, or is only whitespace), an envelope segment (FHS, BHS, BTS, FTS)
_NOT_PLAIN = re.compile(rb"\r[ \t\x0b\x0c]|\r[FB][HT]S")
_EMPTY_SEGMENTS = re.compile(rb"\r\r+")


def _plain_file(data: bytes) -> list[RawMessage] | None:
    """The messages of a file whose segments need no per-segment care (the usual feed),
    framed by whole-file operations; None for any other file. Gives exactly what the
    general framing gives: segments start with their name (no leading whitespace, no
    envelope, no NUL), every message starts with MSH, and the file is valid UTF-8, so
    that each message is (a message cut at segment ends stays valid UTF-8)."""
    if b"\r\r" in data:
        data = _EMPTY_SEGMENTS.sub(b"\r", data)
    data = data.strip(b"\r")
    if not data.startswith(b"MSH") or b"\x00" in data or _NOT_PLAIN.search(data):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = text.split("\rMSH")
    return [
        _message(number, part if number == 1 else "MSH" + part)
        for number, part in enumerate(parts, start=1)
    ]


def _segments(data: bytes) -> list[bytes]:
    """The non-blank segments of `data`, whose line ends are CR already."""
    return [s for s in data.split(b"\r") if s.strip()]


def _msh_field(msh: bytes, n: int) -> bytes:
    """MSH-n of a raw MSH segment (MSH-1 is the separator itself)."""
    if len(msh) < 4:
        return b""
    parts = msh.split(msh[3:4])
    return parts[n - 1] if len(parts) >= n else b""


def _decode(segments: list[bytes]) -> tuple[str, str | None]:
    raw = b"\r".join(segments)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    msh18 = _msh_field(segments[0], 18) if segments[0][:3] == b"MSH" else b""
    declared = msh18.split(segments[0][4:5] or b"^")[0].decode("ascii", "replace").strip()
    codec = CHARSETS.get(declared.upper())
    if codec and codec != "utf-8":
        try:
            return raw.decode(codec), f"decoded as {codec} (MSH-18 {declared})"
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1"), "not valid UTF-8: decoded as latin-1"


def split_messages(data: bytes) -> list[RawMessage]:
    """The messages of a file's bytes, in file order."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    file_note = None
    if data[:2] in UTF16_BOMS:
        # a whole file in UTF-16 (an export tool's choice): read as text, framed as UTF-8
        try:
            data = data.decode("utf-16").encode("utf-8")
            file_note = "decoded as UTF-16 (byte-order mark)"
        except UnicodeDecodeError:
            pass  # left as bytes: its messages are rejected (NUL bytes)
    data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    if file_note is None:  # a decoded UTF-16 file's messages carry its note
        plain = _plain_file(data)
        if plain is not None:
            return plain
    chunks: list[list[bytes]] = []
    current: list[bytes] | None = None
    for seg in _segments(data):
        head = seg.lstrip()[:3]
        if head in ENVELOPE:
            current = None
            continue
        if head == b"MSH":
            current = [seg.lstrip()]
            chunks.append(current)
        elif current is None:  # content before any MSH: a chunk of its own
            current = [seg]
            chunks.append(current)
        else:
            current.append(seg)
    messages = []
    nul = b"\x00" in data  # one search of the file, not one per segment
    for number, segs in enumerate(chunks, start=1):
        if nul and any(b"\x00" in s for s in segs):
            text = b"\r".join(segs).decode("latin-1").replace("\x00", "")
            messages.append(_message(number, text, error="contains NUL bytes"))
            continue
        text, note = _decode(segs)
        note = note or file_note
        error = None if segs[0][:3] == b"MSH" else "no MSH segment"
        messages.append(_message(number, text, note=note, error=error))
    return messages


def _message(number: int, text: str, **kw: str | None) -> RawMessage:
    return RawMessage(number, text, **kw)
