"""Content hashes of files on disk."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol

_CHUNK = 1 << 20

# One read buffer per thread, reused: allocating (and zeroing) 1 MiB for every file costs more
# than hashing a typical 30 kB image.
_local = threading.local()


def _buffer() -> memoryview:
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = memoryview(bytearray(_CHUNK))
        _local.view = view
    return view


class Readable(Protocol):
    """What :func:`sha256_rest` reads from: an open binary file (raw or buffered)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def sha256_rest(handle: Readable, start: bytes = b"") -> str:
    """The hex sha256 of ``start`` followed by everything ``handle`` yields from where it is.

    Lets a caller that already read a file's head hash the whole file without opening it a
    second time. Raises OSError when reading fails.
    """
    digest = hashlib.sha256(start)
    view = _buffer()
    while n := handle.readinto(view):
        digest.update(view[:n])
    return digest.hexdigest()


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB chunks. Raises OSError."""
    digest = hashlib.sha256()
    view = _buffer()
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()
