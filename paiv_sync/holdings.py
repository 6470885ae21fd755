"""What the dataset already holds of a set of ledger rows: the server's side of "exactly once".

The server's file list carries no content hash, so a stored file is recognised by its
original name (as sent) and size in its category, counting the copies the ledger already
knows about — earlier contents of replaced files included. Where the server keeps and queries
the upload tags (paiv_sync.tags), a row sent in a known batch is looked for among exactly that
batch's files instead.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from paiv_sync.api import MviClient, as_int, wire_name
from paiv_sync.ledger import FileRow, Ledger
from paiv_sync.tags import ServerTags, batch_query

# (ledger row id, the server's file id where known) for each row the dataset holds.
Held = list[tuple[int, str | None]]


class Holdings:
    """Looks rows up in the dataset; raises the client's MviError when it cannot be asked."""

    def __init__(self, client: MviClient, ledger: Ledger, tags: ServerTags) -> None:
        self._client = client
        self._ledger = ledger
        self._tags = tags

    def held(
        self, dataset_id: str, category: str, category_id: str, rows: Iterable[FileRow]
    ) -> Held:
        """The rows of ``category`` the dataset holds, by batch where it can, else by name."""
        rows = list(rows)
        if self._tags.supported(dataset_id) and all(r.batch_id is not None for r in rows):
            return self._held_in_batches(dataset_id, rows)
        return self.held_by_name_and_size(dataset_id, category, category_id, rows)

    def _held_in_batches(self, dataset_id: str, rows: list[FileRow]) -> Held:
        """Rows the server holds, asking it for exactly the files of each row's batch.

        Of the files tagged with a batch, those the ledger already records as uploaded are
        set aside; each row then takes one of the rest with its name and size.
        """
        tags = self._tags.tags
        assert tags is not None  # supported() is False without tags
        found: Held = []
        by_batch: dict[int, list[FileRow]] = {}
        for row in rows:
            assert row.batch_id is not None
            by_batch.setdefault(row.batch_id, []).append(row)
        for batch_id, group in by_batch.items():
            tagged = list(
                self._client.iter_files(dataset_id, query=batch_query(tags.batch(batch_id)))
            )
            listed = {str(f["_id"]) for f in tagged if f.get("_id") is not None}
            # A row that already names its stored copy (recorded, then put in doubt by a
            # crash before the commit was on disk) is held when that copy is listed.
            own = {r.server_file_id for r in group if r.server_file_id in listed}
            set_aside = self._ledger.known_server_ids(listed - own) | own
            free: dict[tuple[str, int], list[str | None]] = {}
            for item in tagged:
                server_id = item.get("_id")
                if server_id is not None and str(server_id) in set_aside:
                    continue
                key = (str(item.get("original_file_name", "")), as_int(item.get("size")))
                free.setdefault(key, []).append(None if server_id is None else str(server_id))
            for row in group:
                if row.server_file_id in own:
                    found.append((row.id, row.server_file_id))
                    continue
                copies = free.get((wire_name(row.upload_name), row.size))
                if copies:
                    found.append((row.id, copies.pop(0)))
        return found

    def held_by_name_and_size(
        self, dataset_id: str, category: str, category_id: str, rows: Iterable[FileRow]
    ) -> Held:
        """The rows the category's file list holds beyond the copies the ledger uploaded."""
        server: dict[tuple[str, int], list[str | None]] = {}
        listed: set[object] = set()
        for item in self._client.iter_files(dataset_id, category_id=category_id):
            server_id = item.get("_id")
            if server_id is not None:
                # Paging while files arrive can list one twice: a repeat must not count as a
                # second copy, or an unsent file would pass for stored.
                if server_id in listed:
                    continue
                listed.add(server_id)
            key = (str(item.get("original_file_name", "")), as_int(item.get("size")))
            server.setdefault(key, []).append(server_id)
        # The server records a file under the name it was sent as, which is not always the
        # name on disk (see ``wire_name``): compare names as the server knows them.
        known: Counter[tuple[str, int]] = Counter()
        for (name, size), count in self._ledger.uploaded_keys(category).items():
            known[(wire_name(name), size)] += count
        found: Held = []
        taken: Counter[tuple[str, int]] = Counter()
        for row in rows:
            key = (wire_name(row.upload_name), row.size)
            copies = server.get(key, [])
            if len(copies) - known.get(key, 0) - taken[key] > 0:
                found.append((row.id, copies[-1 - taken[key]]))
                taken[key] += 1
        return found
