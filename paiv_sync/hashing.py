"""Content hashes of files on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB chunks. Raises OSError."""
    digest = hashlib.sha256()
    with Path(path).open("rb", buffering=0) as handle:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()
