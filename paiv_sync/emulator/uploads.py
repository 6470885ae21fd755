"""Reading an upload: ``multipart/form-data`` parsed by werkzeug, streamed and hashed.

File bodies are never kept: each part is hashed as it arrives and only its first bytes are
held (to recognise the type and to read text fields). A part that turns out to be a zip
archive is spooled to a temporary file so it can be expanded; its members are hashed the
same way.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

log = logging.getLogger(__name__)

FILES_FIELD = "files"

# Enough for the magic numbers and for any sensible text field (a category name or id).
_HEAD_BYTES = 4096
_CHUNK = 64 * 1024
# A zip part is kept in memory up to this size, then spilled to a temporary file.
_SPOOL_IN_MEMORY = 1024 * 1024

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


class UploadError(ValueError):
    """The request body is not a usable ``multipart/form-data`` upload."""


@dataclass(frozen=True)
class UploadedFile:
    """One file taken from an upload: a ``files`` part, or a member of a zip part.

    ``file_type`` and ``content_type`` are None, and ``fault`` says why, when the content is
    not an accepted type (JPEG, PNG, MP4) or could not be read.
    """

    original_file_name: str
    size: int
    sha256: str
    file_type: str | None
    content_type: str | None
    fault: str | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class UploadForm:
    """What an upload carried: its text fields (first value of each) and its files, in order."""

    fields: dict[str, str]
    files: tuple[UploadedFile, ...]


def sniff(head: bytes) -> tuple[str, str] | None:
    """Return ``(file_type, content_type)`` for the accepted types by magic bytes, else None."""
    if head.startswith(_JPEG_MAGIC):
        return "image", "image/jpeg"
    if head.startswith(_PNG_MAGIC):
        return "image", "image/png"
    # ISO base media (MP4): a box size, then the "ftyp" box type.
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "video", "video/mp4"
    return None


def parse_upload(
    stream: IO[bytes], content_type: str | None, content_length: int | None
) -> UploadForm:
    """Parse a ``multipart/form-data`` body from ``stream`` (already limited to the body).

    Parts named ``files`` are files; every other part is a text field, also when it carries a
    filename (``requests`` sends ``files={"category_name": (None, "x")}``-style fields so).
    Returns the fields and the files, zip parts expanded into their members.

    Raises UploadError when the body is not multipart or cannot be parsed; werkzeug's
    ``ClientDisconnected`` propagates when the client goes away mid-body.
    """
    mimetype, options = parse_options_header(content_type or "")
    if mimetype != "multipart/form-data":
        raise UploadError(f"expected a multipart/form-data body, got {mimetype or 'none'}")
    if not options.get("boundary"):
        raise UploadError("multipart/form-data body without a boundary")
    sinks: list[_PartSink] = []

    def stream_factory(
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        sink = _PartSink()
        sinks.append(sink)
        return cast(IO[bytes], sink)

    parser = FormDataParser(stream_factory=stream_factory, silent=False)
    try:
        _, form, parts = parser.parse(stream, mimetype, content_length, options)
        fields: dict[str, str] = {}
        for name, value in form.items(multi=True):
            fields.setdefault(name, value)
        files: list[UploadedFile] = []
        for name, storage in parts.items(multi=True):
            sink = cast(_PartSink, storage.stream)
            if name != FILES_FIELD:
                fields.setdefault(name, sink.text(name))
                continue
            file_name = _base_name(storage.filename)
            if sink.is_zip:
                files.extend(_expand_zip(sink, file_name))
            else:
                files.append(sink.uploaded(file_name))
    except ValueError as exc:
        raise UploadError(f"malformed multipart body: {exc}") from exc
    finally:
        for sink in sinks:
            sink.close()
    return UploadForm(fields=fields, files=tuple(files))


class _PartSink:
    """Where werkzeug writes one file part: hashes it, keeps its head, spools it if a zip."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._size = 0
        self._spool: IO[bytes] | None = None

    # The file-like surface werkzeug's parser uses.
    def write(self, data: bytes) -> int:
        before = self._size
        self._hash.update(data)
        self._size += len(data)
        if self._spool is not None:
            self._spool.write(data)
        elif before < len(_ZIP_MAGICS[0]) <= self._size:
            # The first four bytes have just arrived, and all earlier bytes are in the head.
            earlier = bytes(self._head[:before])
            if (earlier + data)[: len(_ZIP_MAGICS[0])] in _ZIP_MAGICS:
                # Closed by close(), which parse_upload calls for every sink it made.
                spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
                    max_size=_SPOOL_IN_MEMORY, mode="w+b"
                )
                self._spool = cast(IO[bytes], spool)
                self._spool.write(earlier)
                self._spool.write(data)
        if len(self._head) < _HEAD_BYTES:
            self._head += data[: _HEAD_BYTES - len(self._head)]
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._spool is not None:
            return self._spool.seek(offset, whence)
        return 0

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def is_zip(self) -> bool:
        return self._spool is not None

    def text(self, field_name: str) -> str:
        """The part read as a text field."""
        if self._size > _HEAD_BYTES:
            raise UploadError(f"text field {field_name!r} is longer than {_HEAD_BYTES} bytes")
        return bytes(self._head).decode("utf-8", "replace")

    def uploaded(self, file_name: str) -> UploadedFile:
        return _describe(file_name, self._size, self._hash.hexdigest(), bytes(self._head))

    def archive(self) -> IO[bytes]:
        assert self._spool is not None
        self._spool.seek(0)
        if not hasattr(self._spool, "seekable"):
            # Python 3.10: SpooledTemporaryFile has no seekable(), which zipfile asks.
            return cast(IO[bytes], _Seekable(self._spool))
        return self._spool


class _Seekable:
    """The reading surface zipfile uses, over a file that does not say it can seek."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def dimensions(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a PNG or JPEG from its first bytes, None when not found there."""
    if head.startswith(_PNG_MAGIC) and len(head) >= 24 and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not head.startswith(_JPEG_MAGIC):
        return None
    at = 2
    while at + 9 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        # Start of frame: every SOFn but DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(head[at + 5 : at + 7], "big")
            width = int.from_bytes(head[at + 7 : at + 9], "big")
            return width, height
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        at += 2 + length
    return None


def _describe(file_name: str, size: int, sha256: str, head: bytes) -> UploadedFile:
    kind = sniff(head)
    if kind is not None:
        size_wh = dimensions(head) if kind[0] == "image" else None
        width, height = size_wh if size_wh is not None else (None, None)
        return UploadedFile(file_name, size, sha256, kind[0], kind[1], None, width, height)
    reason = "empty file" if size == 0 else "not a JPEG, PNG or MP4 file (by its content)"
    return UploadedFile(file_name, size, sha256, None, None, f"{file_name}: {reason}")


def _expand_zip(sink: _PartSink, zip_name: str) -> Iterator[UploadedFile]:
    """Yield one UploadedFile per member of the zip part (folders and macOS debris skipped)."""
    try:
        archive = zipfile.ZipFile(sink.archive())
    except (zipfile.BadZipFile, OSError) as exc:
        yield UploadedFile(zip_name, 0, "", None, None, f"{zip_name}: not a readable zip ({exc})")
        return
    with archive:
        for info in archive.infolist():
            name = _base_name(info.filename)
            if info.is_dir() or info.filename.startswith("__MACOSX/") or name.startswith("."):
                continue
            yield _read_member(archive, info, name, zip_name)


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, zip_name: str
) -> UploadedFile:
    digest = hashlib.sha256()
    head = bytearray()
    size = 0
    try:
        with archive.open(info) as member:
            while chunk := member.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < _HEAD_BYTES:
                    head += chunk[: _HEAD_BYTES - len(head)]
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:
        # RuntimeError: an encrypted member; the others: a damaged archive.
        return UploadedFile(name, size, "", None, None, f"{zip_name}/{name}: unreadable ({exc})")
    return _describe(name, size, digest.hexdigest(), bytes(head))


def _base_name(filename: Any) -> str:
    """The last path component of a client-given file name (either slash), or ``file``."""
    text = str(filename or "").replace("\\", "/").rstrip("/")
    return text.rsplit("/", 1)[-1] or "file"
