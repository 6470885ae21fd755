"""What tells one version of a file from another without reading it.

Size and mtime alone miss a replacement that keeps both: ``cp -p``, ``rsync -t`` and many sync
tools copy the times along with the content. The inode change time (ctime) cannot be set by
such tools (any write, rename into place or chmod sets it to now), and a file renamed into
place brings its own inode number: a file whose four values all match was not touched since.
A mismatch that only chmod, a new hard link or a metadata tool caused costs one hash and
nothing more: the same content is never sent again.

Rows recorded before ctime and inode were kept have neither: for those, size and mtime decide,
as they did, and the next scan records the other two.
"""

from __future__ import annotations

import os
from typing import NamedTuple


class Stamp(NamedTuple):
    """One stat of a file, as far as telling its versions apart goes."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        """The stamp of a stat (or fstat, lstat) result."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def unchanged(
    recorded: tuple[int, int, int | None, int | None],
    size: int,
    mtime_ns: int,
    ctime_ns: int,
    inode: int,
) -> bool:
    """Whether a file seen with these values is the version ``recorded`` describes.

    ``recorded`` is ``(size, mtime_ns, ctime_ns, inode)`` as the ledger holds them; a ctime of
    None (a row from before they were kept) leaves size and mtime to decide alone.
    """
    if recorded[0] != size or recorded[1] != mtime_ns:
        return False
    return recorded[2] is None or (recorded[2] == ctime_ns and recorded[3] == inode)
