"""Image checks: what kind of image a file is and whether it is complete.

Only JPEG and PNG are accepted, the types MVI classification datasets take. A check reads the
head and the tail of a file, never the whole file: it runs for every new file, and the whole
content is read once anyway when the pipeline hashes it.

``make_png`` and ``make_jpeg`` build small valid images in code, for the tests, the benchmarks
and the demo, so nothing has to be downloaded.
"""

from __future__ import annotations

import functools
import io
import os
import random
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from paiv_sync.hashing import sha256_rest
from paiv_sync.stamps import Stamp

__all__ = [
    "Inspection",
    "check_image",
    "content_type",
    "inspect_image",
    "make_jpeg",
    "make_png",
    "sniff",
]

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The IEND chunk never varies: zero length, type, and the CRC of the type.
PNG_IEND = b"IEND\xaeB`\x82"
JPEG_EOI = b"\xff\xd9"

HEAD_SIZE = 64 * 1024
TAIL_SIZE = 64 * 1024

_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}

# Bytes that appear in text files (printable ASCII, the usual whitespace and control
# characters, and every byte >= 0x80 so that UTF-8 and Latin-1 text count as text). A head
# made only of these is text; the same rule as file(1) and git's binary detection.
_TEXT_BYTES = bytes({7, 8, 9, 10, 11, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F})

# Other image and container types that people drop into folders by mistake, named in the
# reason so the user knows what to convert.
_OTHER_KINDS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
)


def sniff(head: bytes) -> str | None:
    """Name the image kind from the first bytes of a file.

    Takes at least the first 8 bytes. Returns ``"jpeg"`` (``FF D8 FF``), ``"png"`` (the 8-byte
    PNG signature) or None for anything else.
    """
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return None


def content_type(kind: str) -> str:
    """Return the MIME type for a kind from :func:`sniff`.

    Raises ValueError for a kind that is not ``"jpeg"`` or ``"png"``.
    """
    try:
        return _CONTENT_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown image kind {kind!r}") from None


def _describe_other(head: bytes) -> str:
    if not head.translate(None, _TEXT_BYTES):
        return "not an image (starts with text)"
    if head[4:8] == b"ftyp":
        return "not a JPEG or PNG image (looks like HEIC or a video)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "not a JPEG or PNG image (looks like WebP)"
    for magic, name in _OTHER_KINDS:
        if head.startswith(magic):
            return f"not a JPEG or PNG image (looks like {name})"
    return "not an image (unknown content)"


def _human_sizes(size: int, limit: int) -> str:
    """Render ``size > limit`` in the limit's unit, with just enough decimals to differ."""
    units = (("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
    chosen = next(((unit, scale) for unit, scale in units if limit >= scale), None)
    if chosen is None:
        return f"{size} bytes > {limit} bytes"
    unit, scale = chosen
    for decimals in range(4):
        left = f"{size / scale:.{decimals}f}"
        right = f"{limit / scale:.{decimals}f}"
        if left != right:
            return f"{left} {unit} > {right} {unit}"
    return f"{size} bytes > {limit} bytes"


class _Handle(Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def read(self, size: int = -1, /) -> bytes | None: ...


def _read_at(handle: _Handle, head: bytes, offset: int, count: int) -> bytes:
    """Read ``count`` bytes at ``offset``, from the head already in memory when possible."""
    if offset + count <= len(head):
        return head[offset : offset + count]
    handle.seek(offset)
    return handle.read(count) or b""


def _jpeg_scan_start(handle: _Handle, head: bytes, size: int) -> int | None:
    """Find the first start-of-scan marker by walking the segment headers.

    Returns its offset; 2 when the segment structure is unusual (so the caller falls back to
    looking for the end marker anywhere); None when the file ends before any image data.
    Knowing where the scan starts matters because an EXIF thumbnail near the head carries its
    own end-of-image marker, which must not make a truncated small file look complete.
    """
    offset = 2
    for _ in range(4096):  # a real JPEG has a few dozen segments; this bounds damaged ones
        header = _read_at(handle, head, offset, 4)
        if len(header) < 2:
            return None
        if header[0] != 0xFF:
            return 2
        marker = header[1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker == 0xDA:
            return offset
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        if marker == 0xD9:  # end of image before any scan: tables only, no picture
            return None
        if len(header) < 4:
            return None
        offset += 2 + int.from_bytes(header[2:4], "big")
        if offset >= size:
            return None
    return 2


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect_image` found: a reason to refuse the file, or its kind and hash."""

    problem: str | None  # as check_image returns it; None for a complete JPEG or PNG
    kind: str | None = None  # "jpeg" or "png" when problem is None
    sha256: str | None = None  # hex digest of the whole file when problem is None
    stamp: Stamp | None = None  # the stamp of the file read (from the open file), if regular


def _problem(
    handle: _Handle, head: bytes, size: int, max_size: int | None
) -> tuple[str | None, str | None]:
    """The checks of :func:`check_image` on an open file: ``(reason or None, kind or None)``."""
    if size == 0:
        return "empty file", None
    kind = sniff(head)
    if kind is None:
        return _describe_other(head[:512]), None
    if max_size is not None and size > max_size:
        return f"larger than the size limit ({_human_sizes(size, max_size)})", kind
    if kind == "png":
        if head[8:16] != b"\x00\x00\x00\x0dIHDR":
            return "damaged PNG (no IHDR header)", kind
        tail_start = max(8, size - TAIL_SIZE)
        if PNG_IEND not in _read_at(handle, head, tail_start, size - tail_start):
            return "truncated PNG (no IEND chunk)", kind
        return None, kind
    scan_start = _jpeg_scan_start(handle, head, size)
    if scan_start is None:
        return "truncated JPEG (no end-of-image marker)", kind
    tail_start = max(scan_start + 2, size - TAIL_SIZE)
    # Inside the compressed data every FF byte is followed by 00 or a restart marker, so
    # FF D9 after the scan start is the real end marker. Data appended after it (camera
    # maker trailers) is allowed.
    if JPEG_EOI not in _read_at(handle, head, tail_start, size - tail_start):
        return "truncated JPEG (no end-of-image marker)", kind
    return None, kind


def check_image(path: Path, max_size: int | None = None) -> str | None:
    """Check that a file is a complete JPEG or PNG image.

    Takes the file's path and an optional size limit in bytes. Returns None when the file is
    a complete image of an accepted kind, else a short reason a person can act on, e.g.
    ``"empty file"``, ``"not a regular file (…)"``, ``"not an image (starts with text)"``,
    ``"truncated JPEG (no end-of-image marker)"``, ``"truncated PNG (no IEND chunk)"`` or
    ``"larger than the size limit (123 MB > 100 MB)"``. Reads only the head and the tail.
    Raises OSError when the file cannot be opened or read.
    """
    return _inspect(path, max_size, digest=False).problem


def inspect_image(path: Path | str, max_size: int | None = None) -> Inspection:
    """Check, name and hash a file with one open: :func:`check_image`, :func:`sniff` and sha256.

    Takes the file's path and an optional size limit in bytes. Returns an Inspection whose
    ``problem`` is what :func:`check_image` would return; only when it is None are ``kind``
    and ``sha256`` (of the whole file) set. A file that fails a check is not read further.
    Raises OSError when the file cannot be opened or read.
    """
    return _inspect(path, max_size, digest=True)


def _inspect(path: Path | str, max_size: int | None, *, digest: bool) -> Inspection:
    # O_NONBLOCK: opening a named pipe (a FIFO called "x.jpg") would otherwise wait for a
    # writer forever; for a regular file the flag changes nothing. Unbuffered: the head is
    # read in one call and, to hash, the rest goes straight into the hasher's buffer.
    with open(path, "rb", buffering=0, opener=_open_nonblocking) as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            return Inspection("not a regular file (a named pipe, socket or device)")
        stamp = Stamp.of(st)
        head = _read_head(handle)
        size = handle.seek(0, 2)
        problem, kind = _problem(handle, head, size, max_size)
        if problem is not None or not digest:
            return Inspection(problem, kind, stamp=stamp)
        # Small images (most of them) are whole in ``head``: no second read.
        handle.seek(len(head))
        return Inspection(None, kind, sha256_rest(handle, head), stamp)


def _read_head(handle: io.FileIO) -> bytes:
    """Up to HEAD_SIZE bytes from the start (a raw read may return fewer than asked)."""
    head = handle.read(HEAD_SIZE) or b""
    while len(head) < HEAD_SIZE:
        more = handle.read(HEAD_SIZE - len(head))
        if not more:
            break
        head += more
    return head


# --- images made in code -----------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=256)
def _shift_table(offset: int) -> bytes:
    """A bytes.translate table adding ``offset`` to every byte, modulo 256."""
    return bytes((value + offset) & 0xFF for value in range(256))


def make_png(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    """Build a valid 8-bit RGB PNG in memory.

    Takes the size in pixels (each at least 1) and a seed; the same seed gives the same bytes
    and different seeds give different pixels and bytes. Returns the file's bytes. Raises
    ValueError for a size below 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be at least 1x1, got {width}x{height}")
    rng = random.Random(seed)
    red, green, blue = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    # A colour gradient tinted by the seed looks like a picture in the demo and compresses
    # well; the seed's own bytes then go into the first pixels so no two seeds collide.
    row_pixels = bytearray()
    for x in range(width):
        shade = (x * 255) // max(1, width - 1)
        row_pixels += bytes(((red + shade) & 0xFF, green, (blue + 255 - shade) & 0xFF))
    rows = bytearray()
    for y in range(height):
        offset = (y * 255) // max(1, height - 1)
        rows.append(0)  # filter type: none
        rows += row_pixels.translate(_shift_table(offset)) if offset else row_pixels
    signature = (seed & (2**64 - 1)).to_bytes(8, "little")
    marker = signature[: min(len(signature), 3 * width * height)]
    for index, value in enumerate(marker):
        row, column = divmod(index, 3 * width)
        rows[row * (3 * width + 1) + 1 + column] = value
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    text = b"Comment\x00paiv-sync test image, seed " + str(seed).encode()
    return b"".join(
        (
            PNG_MAGIC,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"tEXt", text),
            _png_chunk(b"IDAT", zlib.compress(bytes(rows), 6)),
            _png_chunk(b"IEND", b""),
        )
    )


# Annex K.3 of the JPEG standard: the usual luminance DC table (categories 0 to 11).
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALUES = tuple(range(12))
# Every block is flat, so every AC run is just end-of-block: one code of one bit suffices.
_AC_BITS = (1,) + (0,) * 15
_AC_VALUES = (0x00,)


def _huffman_codes(bits: tuple[int, ...], values: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes (JPEG Annex C): symbol -> (code, length)."""
    codes: dict[int, tuple[int, int]] = {}
    code = 0
    index = 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[index]] = (code, length)
            code += 1
            index += 1
        code <<= 1
    return codes


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def make_jpeg(seed: int = 0) -> bytes:
    """Build a valid baseline greyscale JPEG (64x8 pixels) in memory.

    The picture is eight flat 8x8 grey blocks whose levels come from the seed, with the seed
    also in a comment segment, so different seeds give different bytes. Returns the file's
    bytes.
    """
    levels = (seed & (2**64 - 1)).to_bytes(8, "big")
    dc_codes = _huffman_codes(_DC_BITS, _DC_VALUES)
    eob_code, eob_length = _huffman_codes(_AC_BITS, _AC_VALUES)[0x00]

    accumulator = 0
    bit_count = 0
    scan = bytearray()

    def put(value: int, length: int) -> None:
        nonlocal accumulator, bit_count
        accumulator = (accumulator << length) | (value & ((1 << length) - 1))
        bit_count += length
        while bit_count >= 8:
            bit_count -= 8
            byte = (accumulator >> bit_count) & 0xFF
            scan.append(byte)
            if byte == 0xFF:
                scan.append(0x00)  # byte stuffing: FF in the data is always followed by 00
        accumulator &= (1 << bit_count) - 1

    previous = 0
    for level in levels:
        # With every quantiser at 1, a flat block's only coefficient is DC = 8 * (level - 128).
        dc = 8 * (level - 128)
        difference = dc - previous
        previous = dc
        category = abs(difference).bit_length()
        code, length = dc_codes[category]
        put(code, length)
        if category:
            put(difference if difference > 0 else difference - 1, category)
        put(eob_code, eob_length)
    if bit_count:
        put((1 << (8 - bit_count)) - 1, 8 - bit_count)  # pad the last byte with 1-bits

    def huffman_table(
        table_class_and_id: int, bits: tuple[int, ...], values: tuple[int, ...]
    ) -> bytes:
        return bytes((table_class_and_id, *bits, *values))

    return b"".join(
        (
            b"\xff\xd8",
            _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _jpeg_segment(0xFE, b"paiv-sync test image, seed " + str(seed).encode()),
            _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
            _jpeg_segment(0xC0, struct.pack(">BHHB", 8, 8, 64, 1) + b"\x01\x11\x00"),
            _jpeg_segment(
                0xC4,
                huffman_table(0x00, _DC_BITS, _DC_VALUES)
                + huffman_table(0x10, _AC_BITS, _AC_VALUES),
            ),
            _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            bytes(scan),
            JPEG_EOI,
        )
    )
