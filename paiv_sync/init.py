"""``paiv-sync init``: write a starting configuration, and find one when ``--config`` is absent.

The starting configuration is the template shipped in the package (the old demo script's
format with every optional key shown, commented out); what the command line gives is filled
in, the rest keeps its placeholder for ``paiv-sync check`` to point at. The file is created
with mode 600 (it will hold a password or an API key) and never overwrites one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

# Where a configuration is looked for without --config, in this order (see find_config).
CONFIG_ENV = "PAIV_CONFIG"
CONFIG_NAME = "configuration.json"


def template() -> dict[str, Any]:
    """The starting configuration, as shipped in the package."""
    text = resources.files("paiv_sync").joinpath("configuration.json.template").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def starting_config(
    *,
    endpoint: str | None = None,
    username: str | None = None,
    dataset: str | None = None,
    folders: Sequence[str] = (),
    api_key_mode: bool = False,
) -> dict[str, Any]:
    """The template with the values given filled in (paths made absolute)."""
    data = template()
    cred = data["credentials"]
    if endpoint is not None:
        cred["endpoint"] = endpoint
        cred.pop("port", None)  # a port belongs in the endpoint given
    if api_key_mode:
        # MVI 8.x: an API key instead of a user name and password.
        cred.pop("username", None)
        cred.pop("password", None)
        cred["api_key"] = cred.pop("_api_key", "<api_key>")
    elif username is not None:
        cred["username"] = username
    if dataset is not None:
        data["dataset"]["name"] = dataset
        data["model"]["name"] = dataset
    if folders:
        data["folders"] = [os.path.abspath(f) for f in folders]  # noqa: PTH100
    return data


def write_config(path: Path, data: Mapping[str, Any]) -> None:
    """Create ``path`` (mode 600) holding ``data``; FileExistsError if it exists."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


def config_candidates(env: Mapping[str, str], cwd: Path) -> list[tuple[Path, str]]:
    """Where a configuration is looked for without ``--config``, and why there, in order."""
    found: list[tuple[Path, str]] = []
    named = env.get(CONFIG_ENV, "").strip()
    if named:
        found.append((Path(named).expanduser(), f"${CONFIG_ENV}"))
    found.append((cwd / CONFIG_NAME, "the current folder"))
    xdg = env.get("XDG_CONFIG_HOME", "").strip()
    home = env.get("HOME") or str(Path.home())
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path(home) / ".config"
    found.append((base / "paiv-sync" / CONFIG_NAME, "the user's configuration folder"))
    found.append((Path("/etc/paiv-sync") / CONFIG_NAME, "the system's configuration folder"))
    return found


def find_config(env: Mapping[str, str], cwd: Path) -> tuple[Path | None, str]:
    """The configuration to use without ``--config``, and a sentence saying which or where
    it was looked for. ``$PAIV_CONFIG`` is used when set, whether or not the file exists (its
    absence is then the error to report)."""
    candidates = config_candidates(env, cwd)
    if env.get(CONFIG_ENV, "").strip():
        path, why = candidates[0]
        return path, f"using the configuration {path} (from {why})"
    for path, why in candidates:
        if path.is_file():
            return path, f"using the configuration {path} (found in {why})"
    looked = ", ".join(str(path) for path, _ in candidates)
    return None, f"no configuration found (looked for {looked})"
