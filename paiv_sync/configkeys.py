"""Every key of the configuration file, the section it sits in, and its default: one table.

paiv_sync.config reads each key with the default given here, points a key written in the
wrong section at the right one, and lists the choices of a key that has a few. A dotted name
is a key of a section (``"threshold.upload"``); a plain one sits at the top level. The keys
are described in docs/configuration.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from paiv_sync.layout import DEFAULT_EXTENSIONS


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


# Must be given: there is no default.
REQUIRED: Final = _Marker("REQUIRED")
# The default follows from other keys (said in the comment beside the key).
DERIVED: Final = _Marker("DERIVED")
# Optional, and nothing when absent.
ABSENT: Final = _Marker("ABSENT")

DATASET_ACTIONS: Final = ("append", "create")
MODEL_ACTIONS: Final = ("train", "retrain", "nothing")
OBSERVERS: Final = ("auto", "native", "polling")

KEYS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "credentials.endpoint": REQUIRED,
        "credentials.port": ABSENT,  # the endpoint's own port, else the scheme's
        "credentials.username": ABSENT,  # required with a password
        "credentials.password": ABSENT,  # a password or an API key is required
        "credentials.password_file": ABSENT,
        "credentials.api_key": ABSENT,
        "credentials.api_key_file": ABSENT,
        "credentials.verify": True,
        "credentials.timeout": 30.0,
        "folders": REQUIRED,
        "recursive": True,
        "categories": ABSENT,  # folder name -> category name; absent: the folder's name
        "threshold.upload": 10,
        "threshold.training": 100,
        "threshold.train": 100,  # the old script's name of threshold.training
        "skip_duplicates": True,
        "time": 10.0,
        "max_delay": DERIVED,  # the larger of 300 and time
        "batch_size": 20,
        "upload_workers": 2,
        "settle_time": 2.0,
        "rescan_interval": 300.0,
        "extensions": DEFAULT_EXTENSIONS,
        "ignore": ABSENT,  # gitignore patterns, below every root
        "max_file_size": 104857600,
        "poll_interval": 10.0,
        "observer": "auto",
        "polling_interval": 2.0,
        "follow_symlinks": False,
        "health_port": 0,  # 0: off
        "health_host": "127.0.0.1",  # 0.0.0.0 for a Prometheus on another host
        "retry.initial": 1.0,
        "retry.maximum": 60.0,
        "dataset.name": REQUIRED,
        "dataset.action": "append",
        "model.name": DERIVED,  # dataset.name
        "model.action": "retrain",
        "model.strategy": ABSENT,  # an object passed to MVI as the training's parameters
        "ledger": DERIVED,  # in the state folder, named after the configuration file
    }
)

CHOICES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "observer": OBSERVERS,
        "dataset.action": DATASET_ACTIONS,
        "model.action": MODEL_ACTIONS,
    }
)


# Values the old script's files and README used, read as today's.
ALIASES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {"model.action": MappingProxyType({"none": "nothing"})}
)


def _sections() -> Mapping[str, frozenset[str]]:
    sections: dict[str, set[str]] = {"": set()}
    for dotted in KEYS:
        section, _, name = dotted.rpartition(".")
        sections.setdefault(section, set()).add(name)
        if section:
            sections[""].add(section)
    return MappingProxyType({name: frozenset(keys) for name, keys in sections.items()})


# The keys of each section ("" is the top level).
SECTIONS: Final = _sections()


def default(dotted: str) -> Any:
    """The default of the key ``dotted``; a KeyError names a key the table lacks."""
    return KEYS[dotted]
