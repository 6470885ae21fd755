"""Upload tags: the user metadata each upload carries, and what the server does with it.

Each POST tells the server which host, which paiv-sync instance (the ledger's own random id),
which batch and which folders it comes from. Where the server keeps and queries these tags
(learned after the first upload into a dataset, and kept in the ledger), a batch whose answer
was lost is looked up as exactly that batch (paiv_sync.holdings), and another paiv-sync
feeding the same folder into the same dataset can be named.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from paiv_sync.api import MviClient
from paiv_sync.errors import MviError, NotSupportedError
from paiv_sync.ledger import FileRow, Ledger

log = logging.getLogger(__name__)

# The user-metadata keys each upload carries (see docs/configuration.md, "Upload tags").
TAG_HOST = "paiv_sync_host"
TAG_INSTANCE = "paiv_sync_instance"
TAG_BATCH = "paiv_sync_batch"
TAG_FOLDER = "paiv_sync_folder"

# How often (seconds) each category looks for uploads of another paiv-sync from its folder.
OTHER_FEEDER_INTERVAL = 600.0


@dataclass(frozen=True)
class UploadTags:
    """What each upload tells the server of where it came from (as user metadata).

    ``instance`` is the ledger's own random id: with the ledger's batch id it names one batch
    uniquely across every station feeding the dataset, so a batch whose answer was lost can be
    looked up on the server as exactly that batch.
    """

    host: str
    instance: str

    def batch(self, batch_id: int) -> str:
        """The tag value of batch ``batch_id``."""
        return f"{self.instance}:{batch_id}"

    def metadata(self, batch_id: int, rows: Sequence[FileRow]) -> dict[str, str]:
        """The user metadata of one POST of batch ``batch_id`` (holding ``rows``)."""
        return {
            TAG_HOST: self.host,
            TAG_INSTANCE: self.instance,
            TAG_BATCH: self.batch(batch_id),
            TAG_FOLDER: self.folder(rows),
        }

    @staticmethod
    def folder(rows: Sequence[FileRow]) -> str:
        """The folder tag of a POST holding ``rows``: their category folders, sorted."""
        folders = sorted({os.path.join(r.root, r.rel_path.split("/", 1)[0]) for r in rows})
        return "; ".join(folders)


def batch_query(tag: str) -> str:
    """The ``query`` that finds the files of one batch (``tag``: ``UploadTags.batch``)."""
    return f'metadata.{TAG_BATCH} == "{tag}"'


class ServerTags:
    """The tags of this instance's uploads, and whether each dataset's server honours them.

    ``tags`` None: uploads carry no tags (and nothing is looked up by them). Safe to call
    from several threads (a race at most asks the server twice).
    """

    def __init__(
        self,
        client: MviClient,
        ledger: Ledger,
        tags: UploadTags | None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._client = client
        self._ledger = ledger
        self.tags = tags
        self._clock = clock
        self._support: dict[str, bool] = {}
        # Looking for another paiv-sync feeding the dataset from the same folders: when each
        # category is due, what was said, and since when (server time, epoch ms) it counts.
        self._feeder_checks: dict[str, float] = {}
        self._feeders_said: set[tuple[str, str]] = set()
        self._started_ms = int(time.time() * 1000)

    def metadata(self, batch_id: int, rows: Sequence[FileRow]) -> dict[str, str] | None:
        """The user metadata of a POST of ``rows`` in batch ``batch_id`` (None: no tags)."""
        return self.tags.metadata(batch_id, rows) if self.tags is not None else None

    def supported(self, dataset_id: str) -> bool | None:
        """Whether the server stores and queries the upload tags (None: not known yet)."""
        if self.tags is None:
            return False
        if dataset_id not in self._support:
            known = self._ledger.get_meta(f"tags_supported:{dataset_id}")
            if known is None:
                return None
            self._support[dataset_id] = known == "yes"
        return self._support[dataset_id]

    def learn(self, dataset_id: str, batch_id: int, file_id: str) -> None:
        """After the first upload into a dataset: does the server keep and query our tags?

        Yes when the file just stored carries the batch's tag, a query for that tag finds it,
        and a query for a tag nobody sent finds nothing (a server that ignores ``query``
        answers every file). Any other answer is a no; a failure to ask leaves it unknown.
        """
        if self.tags is None or self.supported(dataset_id) is not None:
            return
        tag = self.tags.batch(batch_id)
        client = self._client
        try:
            # One try each: the uploads must not wait on this; unknown means "ask again later".
            metadata = client.file_metadata(dataset_id, file_id, retry=False)
            supported = metadata.get(TAG_BATCH) == tag
            if supported:
                found = client.list_files(dataset_id, query=batch_query(tag), retry=False)
                nobody = client.list_files(
                    dataset_id, query=batch_query(tag + ":none"), retry=False
                )
                supported = file_id in {f.get("_id") for f in found} and not nobody
        except NotSupportedError:
            supported = False
        except MviError as exc:
            log.debug("could not check whether the server keeps upload tags: %s", exc)
            return
        self._support[dataset_id] = supported
        self._ledger.set_meta(f"tags_supported:{dataset_id}", "yes" if supported else "no")
        log.info(
            "the server %s the upload tags (user metadata): files in doubt are looked up %s",
            "keeps and queries" if supported else "does not keep or query",
            "by their batch" if supported else "by name and size in their category",
        )

    def look_for_other_feeders(
        self, dataset_id: str, category: str, rows: Sequence[FileRow]
    ) -> None:
        """Say so when another paiv-sync uploads from the folder of ``rows`` into this dataset.

        Two services with their own ledgers on the same folders each send every image: the
        dataset gets it twice. Their uploads carry another instance tag: one query (every
        OTHER_FEEDER_INTERVAL per category, where the server keeps and queries the tags) finds
        such files stored since this process started.
        """
        tags = self.tags
        now = self._clock()
        if (
            tags is None
            or not self.supported(dataset_id)
            or now < self._feeder_checks.get(category, 0.0)
        ):
            return
        self._feeder_checks[category] = now + OTHER_FEEDER_INTERVAL
        folder = tags.folder(rows)
        if not folder or any(c in folder for c in '"\\,'):
            return  # not a value a query can carry safely: the check is skipped
        query = (
            f'metadata.{TAG_FOLDER} == "{folder}", metadata.{TAG_INSTANCE} != "{tags.instance}", '
            f"created_at > {self._started_ms}"
        )
        try:
            found = self._client.list_files(dataset_id, query=query, limit=1, retry=False)
            if not found:
                return
            other = self._client.file_metadata(dataset_id, str(found[0].get("_id")), retry=False)
        except MviError as exc:
            log.debug("could not look for another paiv-sync feeding %s: %s", folder, exc)
            return
        instance = str(other.get(TAG_INSTANCE, "?"))
        if (folder, instance) in self._feeders_said:
            return
        self._feeders_said.add((folder, instance))
        log.warning(
            "another paiv-sync (host %s, instance %s, not this one's ledger) is uploading files "
            "from %s into dataset %s too: each image may reach the dataset twice. Run one "
            "paiv-sync per folder and dataset (stop the other, or take the folder out of one "
            "of the configurations)",
            other.get(TAG_HOST, "?"),
            instance,
            folder,
            dataset_id,
        )
