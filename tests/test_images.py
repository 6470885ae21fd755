"""Image checks on real files: kinds, completeness, size limit, and the images made in code."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest

from paiv_sync.images import check_image, content_type, make_jpeg, make_png, sniff


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, payload) chunks, checking every length and CRC on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = []
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        offset += 12 + length
    assert offset == len(data)
    return chunks


def jpeg_segments(data: bytes) -> list[int]:
    """Walk a baseline JPEG's markers up to the scan; return the marker bytes in order."""
    assert data[:2] == b"\xff\xd8"
    markers = []
    offset = 2
    while True:
        assert data[offset] == 0xFF
        marker = data[offset + 1]
        markers.append(marker)
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        offset += 2 + length
        if marker == 0xDA:
            break
    scan = data[offset:-2]
    # Entropy-coded data: every FF is stuffed with 00, so no marker hides inside.
    assert all(scan[i + 1] == 0 for i in range(len(scan) - 1) if scan[i] == 0xFF)
    assert scan[-1:] != b"\xff"
    assert data[-2:] == b"\xff\xd9"
    return markers


def test_sniff_names_the_two_accepted_kinds() -> None:
    assert sniff(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "jpeg"
    assert sniff(b"\x89PNG\r\n\x1a\n\x00\x00") == "png"
    assert sniff(b"GIF89a") is None
    assert sniff(b"") is None
    assert sniff(b"\xff\xd8") is None  # too short to tell


def test_content_type() -> None:
    assert content_type("jpeg") == "image/jpeg"
    assert content_type("png") == "image/png"
    with pytest.raises(ValueError, match="gif"):
        content_type("gif")


def test_made_png_is_a_complete_valid_png(tmp_path: Path) -> None:
    data = make_png(40, 20, seed=7)
    chunks = png_chunks(data)
    assert chunks[0][0] == b"IHDR"
    assert chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour) == (40, 20, 8, 2)
    pixels = zlib.decompress(b"".join(p for kind, p in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + 3 * width)
    assert all(pixels[row * (1 + 3 * width)] == 0 for row in range(height))  # filter bytes
    assert check_image(write(tmp_path, "a.png", data)) is None
    assert sniff(data) == "png"


def test_made_pngs_differ_by_seed_and_repeat_for_the_same_seed() -> None:
    assert make_png(seed=3) == make_png(seed=3)
    many = {make_png(seed=seed) for seed in range(500)}
    assert len(many) == 500
    # Even the pixels differ, not only the comment (a server may compare decoded content).
    tiny = {zlib.decompress(png_chunks(make_png(2, 2, seed=s))[2][1]) for s in range(300)}
    assert len(tiny) == 300


def test_make_png_rejects_an_empty_size() -> None:
    with pytest.raises(ValueError, match="0x5"):
        make_png(0, 5)


def test_made_jpeg_has_a_valid_baseline_structure(tmp_path: Path) -> None:
    data = make_jpeg(seed=0x0123456789ABCDEF)
    markers = jpeg_segments(data)
    # APP0, comment, quantisation table, baseline frame, Huffman tables, start of scan.
    assert markers == [0xE0, 0xFE, 0xDB, 0xC0, 0xC4, 0xDA]
    frame = data[data.index(b"\xff\xc0") + 4 :][:6]
    precision, height, width, components = struct.unpack(">BHHB", frame)
    assert (precision, height, width, components) == (8, 8, 64, 1)
    assert check_image(write(tmp_path, "a.jpg", data)) is None
    assert sniff(data) == "jpeg"
    assert len({make_jpeg(seed) for seed in range(300)}) == 300


def test_good_files_pass(tmp_path: Path) -> None:
    assert check_image(write(tmp_path, "a.png", make_png())) is None
    assert check_image(write(tmp_path, "b.jpg", make_jpeg())) is None
    # The extension does not matter, the content does.
    assert check_image(write(tmp_path, "c.jpeg", make_png())) is None


def test_empty_file(tmp_path: Path) -> None:
    assert check_image(write(tmp_path, "empty.jpg", b"")) == "empty file"


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.jpg", "Grüße, this is a note\n".encode() * 10)
    assert check_image(path) == "not an image (starts with text)"


def test_other_binary_formats_are_named(tmp_path: Path) -> None:
    gif = write(tmp_path, "x.jpg", b"GIF89a" + bytes(range(256)))
    assert check_image(gif) == "not a JPEG or PNG image (looks like GIF)"
    noise = write(tmp_path, "y.png", b"\x00\x01\x02\x03" * 100)
    assert check_image(noise) == "not an image (unknown content)"


def test_truncated_png(tmp_path: Path) -> None:
    data = make_png(64, 64)
    assert check_image(write(tmp_path, "half.png", data[: len(data) // 2])) == (
        "truncated PNG (no IEND chunk)"
    )
    assert check_image(write(tmp_path, "no_end.png", data[:-12])) == (
        "truncated PNG (no IEND chunk)"
    )


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = make_jpeg(seed=99)
    assert check_image(write(tmp_path, "cut.jpg", data[:-2])) == (
        "truncated JPEG (no end-of-image marker)"
    )
    # Cut inside the header segments, before any image data.
    assert check_image(write(tmp_path, "head.jpg", data[:40])) == (
        "truncated JPEG (no end-of-image marker)"
    )


def test_jpeg_with_thumbnail_end_marker_but_cut_scan_is_truncated(tmp_path: Path) -> None:
    # An EXIF-like APP1 segment holding its own FF D9 (as an embedded thumbnail does) must not
    # make a cut-off small file look complete.
    data = make_jpeg(seed=5)
    thumbnail = b"Exif\x00\x00" + b"\xff\xd8\xff\xd9"
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 2) + thumbnail
    with_thumb = data[:2] + app1 + data[2:]
    assert check_image(write(tmp_path, "ok.jpg", with_thumb)) is None
    assert check_image(write(tmp_path, "cut.jpg", with_thumb[:-4])) == (
        "truncated JPEG (no end-of-image marker)"
    )


def test_jpeg_with_trailer_after_end_marker_is_accepted(tmp_path: Path) -> None:
    # Some cameras append maker data after the end-of-image marker.
    data = make_jpeg(seed=5) + b"\x00" * 100 + b"TRAILER"
    assert check_image(write(tmp_path, "trailer.jpg", data)) is None


def test_large_file_checks_only_head_and_tail(tmp_path: Path) -> None:
    data = make_png(16, 16)
    # A big PNG: a large ancillary chunk in the middle, far beyond the head and tail reads.
    filler = b"\x00" * (3 * 1024 * 1024)
    chunk = struct.pack(">I", len(filler)) + b"zzZz" + filler
    chunk += struct.pack(">I", zlib.crc32(b"zzZz" + filler))
    big = data[:33] + chunk + data[33:]
    assert check_image(write(tmp_path, "big.png", big)) is None
    assert check_image(write(tmp_path, "bigcut.png", big[:-12])) == "truncated PNG (no IEND chunk)"


def test_size_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", make_png(8, 8))
    size = path.stat().st_size
    assert check_image(path, max_size=size) is None
    assert check_image(path, max_size=size - 1) == (
        f"larger than the size limit ({size} bytes > {size - 1} bytes)"
    )
    big = tmp_path / "big.png"
    with big.open("wb") as handle:
        handle.write(make_png(8, 8)[:-12])
        handle.truncate(123_000_000)  # sparse: no real disk use
    assert check_image(big, max_size=100_000_000) == (
        "larger than the size limit (123 MB > 100 MB)"
    )
    assert check_image(big, max_size=122_900_000) == (
        "larger than the size limit (123.0 MB > 122.9 MB)"
    )


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_image(tmp_path / "gone.jpg")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "locked.png", make_png())
    path.chmod(0)
    try:
        with pytest.raises(PermissionError):
            check_image(path)
    finally:
        path.chmod(0o644)
