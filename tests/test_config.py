"""Tests for paiv_sync.config: loading, validating and the messages a user reads."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from paiv_sync.config import (
    ConfigError,
    load_config,
    normalize_base_url,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "paiv_sync" / "configuration.json.template"  # what `paiv-sync init` writes
SECRET = "hunter2-Zq9"  # distinctive, so a leak is easy to spot in any message
API_KEY = "key-7Yx3-secret"


def seed(folder: Path) -> dict[str, Any]:
    """The old demo script's format, pointing at a real folder."""
    return {
        "credentials": {
            "endpoint": "https://host/powerai-vision",
            "port": "8000",
            "username": "admin",
            "password": SECRET,
        },
        "recursive": 1,
        "threshold": {"training": 3, "upload": 10},
        "skip_duplicates": 1,
        "time": 10,
        "dataset": {"name": "classifier", "action": "append"},
        "model": {"name": "classifier", "action": "retrain", "strategy": {}},
        "folders": [str(folder)],
        "categories": {"buildings": "buildings", "_comment": "optional folder → category override"},
    }


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: nothing from the machine running the tests leaks in."""
    return {"HOME": str(tmp_path / "home")}


def write(path: Path, data: Any, mode: int = 0o600) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    path.chmod(mode)
    return path


def problems(data: Any, env: dict[str, str], **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=Path("/etc/paiv/configuration.json"), env=env, **kwargs)
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


# --- the seed format --------------------------------------------------------------------


def test_seed_format_loads(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    path = write(tmp_path / "configuration.json", seed(images))
    config = load_config(path, env=env)

    assert config.source == path.resolve()
    assert config.base_url == "https://host:8000/powerai-vision/api"
    assert (config.username, config.password, config.api_key) == ("admin", SECRET, None)
    assert config.auth_mode == "password"
    assert config.recursive is True
    assert config.skip_duplicates is True
    assert (config.upload_threshold, config.training_threshold) == (10, 3)
    assert config.quiet_time == 10.0
    assert (config.dataset_name, config.dataset_action) == ("classifier", "append")
    assert (config.model_name, config.model_action) == ("classifier", "retrain")
    assert dict(config.strategy) == {}
    assert config.folders == (images.resolve(),)
    assert dict(config.categories) == {"buildings": "buildings"}
    assert config.category_for("buildings") == "buildings"
    assert config.category_for("forest") == "forest"
    assert config.warnings == ()


def test_defaults(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    minimal = {
        "credentials": {"endpoint": "https://route/api", "api_key": API_KEY},
        "dataset": {"name": "cars"},
        "folders": str(images),  # a single string is accepted too
    }
    config = load_config(write(tmp_path / "site.json", minimal), env=env)

    assert config.auth_mode == "api_key"
    assert (config.username, config.password, config.api_key) == (None, None, API_KEY)
    assert config.verify is True
    assert config.timeout == 30.0
    assert config.folders == (images.resolve(),)
    assert config.recursive is True
    assert config.skip_duplicates is True
    assert dict(config.categories) == {}
    assert (config.upload_threshold, config.training_threshold) == (10, 100)
    assert config.quiet_time == 10.0
    assert config.max_delay == 300.0
    assert config.batch_size == 20
    assert config.upload_workers == 2
    assert config.settle_time == 2.0
    assert config.rescan_interval == 300.0
    assert config.extensions == (".jpg", ".jpeg", ".png")
    assert config.max_file_size == 104857600
    assert config.poll_interval == 10.0
    assert config.observer == "auto"
    assert config.polling_interval == 2.0
    assert config.follow_symlinks is False
    assert config.dataset_action == "append"
    assert (config.model_name, config.model_action) == ("cars", "retrain")
    assert dict(config.strategy) == {}
    state = tmp_path / "home/.local/state/paiv-sync"
    assert config.ledger_path.parent == state
    assert re.fullmatch(r"site-[0-9a-f]{10}\.ledger\.sqlite3", config.ledger_path.name)


def test_new_keys_are_read(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not really a certificate", encoding="utf-8")
    data = seed(images) | {
        "recursive": False,
        "skip_duplicates": 0,
        "batch_size": 500,
        "upload_workers": 16,
        "settle_time": 0,
        "time": 0.5,
        "max_delay": 60,
        "rescan_interval": 0,
        "extensions": ["JPG", "tif", ".PNG", "jpg"],
        "max_file_size": 1000,
        "poll_interval": 0.5,
        "observer": "polling",
        "polling_interval": 0.25,
        "follow_symlinks": True,
        "ledger": "state/ledger.db",
    }
    data["credentials"] |= {"verify": "ca.pem", "timeout": 5}
    data["model"] = {"action": "train", "strategy": {"max_iter": 500, "ratio": 0.8}}
    config = load_config(write(tmp_path / "configuration.json", data), env=env)

    assert config.verify == str(ca.resolve())
    assert config.timeout == 5.0
    assert (config.recursive, config.skip_duplicates, config.follow_symlinks) == (
        False,
        False,
        True,
    )
    assert (config.batch_size, config.upload_workers) == (500, 16)
    assert (config.settle_time, config.quiet_time, config.max_delay) == (0.0, 0.5, 60.0)
    assert config.rescan_interval == 0.0
    assert config.extensions == (".jpg", ".tif", ".png")
    assert config.max_file_size == 1000
    assert (config.poll_interval, config.observer, config.polling_interval) == (
        0.5,
        "polling",
        0.25,
    )
    assert config.ledger_path == tmp_path / "state" / "ledger.db"
    assert (config.model_name, config.model_action) == ("classifier", "train")
    assert dict(config.strategy) == {"max_iter": 500, "ratio": 0.8}


def test_config_is_frozen_and_read_only(images: Path, env: dict[str, str]) -> None:
    config = parse_config(seed(images), source=None, env=env)
    with pytest.raises(AttributeError):
        config.batch_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.categories["x"] = "y"  # type: ignore[index]


# --- endpoint normalisation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "port", "expected"),
    [
        ("https://host/powerai-vision", "8000", "https://host:8000/powerai-vision/api"),
        ("https://host/powerai-vision", 8000, "https://host:8000/powerai-vision/api"),
        ("https://host:8000/powerai-vision/api/", None, "https://host:8000/powerai-vision/api"),
        ("https://host:8000/powerai-vision/api", "8000", "https://host:8000/powerai-vision/api"),
        ("https://host/powerai-vision/api", None, "https://host/powerai-vision/api"),
        ("https://route/api", None, "https://route/api"),
        ("https://route", None, "https://route/api"),
        ("https://route/", None, "https://route/api"),
        ("https://host//visual-insights//api//", None, "https://host/visual-insights/api"),
        ("https://host/powerai-vision/api/api", None, "https://host/powerai-vision/api"),
        ("HTTPS://Host.Example/powerai-vision", "", "https://host.example/powerai-vision/api"),
        ("http://127.0.0.1:5000", None, "http://127.0.0.1:5000/api"),
        ("http://[::1]/x", 9000, "http://[::1]:9000/x/api"),
        ("  https://route/api  ", None, "https://route/api"),
    ],
)
def test_normalize_base_url(endpoint: str, port: str | int | None, expected: str) -> None:
    assert normalize_base_url(endpoint, port) == expected


@pytest.mark.parametrize(
    ("endpoint", "port", "fragment"),
    [
        ("host/powerai-vision", None, 'write it as "https://host/powerai-vision"'),
        ("ftp://host/api", None, "must start with https:// or http://"),
        ("https://host:8000/api", "9000", "differs from the port 8000"),
        ("https://host/api", "eighty", "must be a port number"),
        ("https://host/api", 70000, "must be a port number"),
        ("https:///api", None, "has no host name"),
        ("https://host/api?x=1", None, "must not contain a query"),
        ("", None, "must be a non-empty URL"),
    ],
)
def test_normalize_base_url_rejects(endpoint: str, port: str | int | None, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_base_url(endpoint, port)
    assert fragment in str(info.value)


def test_endpoint_with_user_info_is_rejected_without_echo() -> None:
    with pytest.raises(ValueError) as info:
        normalize_base_url(f"https://admin:{SECRET}@host/api", None)
    assert "must not contain a user name or password" in str(info.value)
    assert SECRET not in str(info.value)


def test_endpoint_errors_name_their_key(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["credentials"]["endpoint"] = "host/powerai-vision"
    [line] = problems(data, env)
    assert line.startswith("configuration.json: credentials.endpoint: ")
    assert "https://host/powerai-vision" in line


# --- every problem at once --------------------------------------------------------------


def test_every_problem_reported_at_once(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["credentials"]["port"] = "http"
    data["threshold"] = {"upload": "ten", "training": 0}
    data["recursive"] = "yes"
    data["time"] = -1
    data["batch_size"] = 0
    data["upload_workers"] = 17
    data["rescan_interval"] = 5
    data["extensions"] = [".jpg", ""]
    data["poll_interval"] = 0
    data["observer"] = "polin"
    data["dataset"] = {"name": "", "action": "replace"}
    data["model"] = {"action": "fine-tune", "strategy": []}
    data["folders"] = [str(images), str(tmp_path / "missing"), 42]
    data["categories"] = {"forest": ""}
    data["ledger"] = 5

    assert problems(data, env) == [
        'configuration.json: credentials.port: must be a port number from 1 to 65535, got "http"',
        f"configuration.json: folders[1]: folder {tmp_path / 'missing'} does not exist",
        "configuration.json: folders[2]: must be a non-empty string (a folder path), got 42",
        'configuration.json: recursive: must be true or false (1 or 0 also work), got "yes"',
        "configuration.json: categories.forest: must be a non-empty string (a category name), "
        'got ""',
        'configuration.json: threshold.upload: must be a positive integer, got "ten"',
        "configuration.json: threshold.training: must be a positive integer, got 0",
        "configuration.json: time: must be a number of at least 0, got -1",
        "configuration.json: batch_size: must be an integer from 1 to 500, got 0",
        "configuration.json: upload_workers: must be an integer from 1 to 16, got 17",
        "configuration.json: rescan_interval: must be 0 (off) or a number of at least 10, got 5",
        'configuration.json: extensions[1]: must be a file extension such as ".jpg", got ""',
        "configuration.json: poll_interval: must be a number greater than 0, got 0",
        'configuration.json: observer: must be one of "auto", "native", "polling", got "polin" '
        '(did you mean "polling"?)',
        'configuration.json: dataset.name: must be a non-empty string, got ""',
        'configuration.json: dataset.action: must be one of "append", "create", got "replace"',
        'configuration.json: model.action: must be one of "train", "retrain", "nothing", '
        'got "fine-tune"',
        "configuration.json: model.strategy: must be an object ({…}), got a list",
        "configuration.json: ledger: must be a non-empty string (a file path), got 5",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("dataset"), 'dataset: missing; give at least "name"'),
        (lambda d: d["dataset"].pop("name"), "dataset.name: missing; the name of the dataset"),
        (lambda d: d.pop("folders"), 'folders: missing; list the folders to watch, e.g. ["'),
        (lambda d: d.update(folders=[]), "folders: must list at least one folder"),
        (lambda d: d.update(credentials="x"), "credentials: must be an object ({…}), got a"),
        (lambda d: d["credentials"].pop("endpoint"), "credentials.endpoint: missing; the server"),
        (lambda d: d["credentials"].pop("username"), "credentials.username: missing; a password"),
        (lambda d: d["credentials"].update(timeout=0), "credentials.timeout: must be a number gre"),
        (lambda d: d["credentials"].update(verify="nope.pem"), "credentials.verify: the CA bundle"),
        (lambda d: d["credentials"].update(verify=1), "credentials.verify: must be true, false or"),
        (lambda d: d.update(max_delay=5), "max_delay: must be at least time (10), got 5"),
        (lambda d: d.update(extensions=".jpg"), "extensions: must be a non-empty list such as"),
        (lambda d: d.update(max_file_size=1.5), "max_file_size: must be a positive integer, got"),
        (lambda d: d.update(settle_time=float("nan")), "settle_time: must be a number of at le"),
        (lambda d: d.update(polling_interval=True), "polling_interval: must be a number greater"),
        (lambda d: d.update(follow_symlinks=2), "follow_symlinks: must be true or false"),
        (lambda d: d.update(threshold=[1]), "threshold: must be an object ({…}), got a list"),
        (lambda d: d.update(categories=["a"]), "categories: must be an object ({…}), got a list"),
        (lambda d: d.update(folders={"a": 1}), "folders: must be a list of folder paths, got an"),
    ],
)
def test_each_error_is_its_own_line(
    images: Path, env: dict[str, str], change: Any, expected: str
) -> None:
    data = seed(images)
    change(data)
    [line] = problems(data, env)
    assert line.startswith(f"configuration.json: {expected}")


def test_folder_that_is_a_file(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x", encoding="utf-8")
    data = seed(images) | {"folders": [str(images), str(a_file)]}
    assert problems(data, env) == [f"configuration.json: folders[1]: {a_file} is not a folder"]


def test_nested_and_repeated_folders(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    inner = images / "forest"
    inner.mkdir()
    data = seed(images) | {"folders": [str(inner), str(images), f"{images}/./"]}
    assert problems(data, env) == [
        f"configuration.json: folders[2]: folder {images} is the same as folders[1]; list it once",
        f"configuration.json: folders[0]: folder {inner} is inside folders[1] ({images}); "
        "watch only one",
    ]


def test_file_level_problems_are_one_sentence(tmp_path: Path, env: dict[str, str]) -> None:
    missing = tmp_path / "configuration.json"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env=env)
    assert info.value.problems == (f"configuration.json: the file {missing} does not exist",)

    missing.write_text('{\n  "time": 10\n  "recursive": 1\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(missing, env=env)
    assert info.value.problems == (
        "configuration.json: not valid JSON at line 3, column 3: Expecting ',' delimiter",
    )

    missing.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(missing, env=env)
    assert info.value.problems == (
        "configuration.json: the top level must be a JSON object ({…}), not a list",
    )

    missing.write_text("  \n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(missing, env=env)
    assert len(info.value.problems) == 1
    assert "the file is empty" in str(info.value)


# --- aliases, booleans, _comment, unknown keys --------------------------------------------


def test_threshold_train_alias(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["threshold"] = {"train": 7, "upload": 2}
    config = parse_config(data, source=None, env=env)
    assert (config.training_threshold, config.upload_threshold) == (7, 2)

    data["threshold"] = {"train": 7, "training": 7}
    assert parse_config(data, source=None, env=env).training_threshold == 7

    data["threshold"] = {"train": 7, "training": 5}
    assert problems(data, env) == [
        'configuration.json: threshold.train: is an alias of "training" and disagrees with it '
        "(7 vs 5); keep only one"
    ]


@pytest.mark.parametrize(("raw", "expected"), [(0, False), (1, True), (False, False), (True, True)])
def test_booleans_accept_numbers(
    images: Path, env: dict[str, str], raw: Any, expected: bool
) -> None:
    data = seed(images) | {"recursive": raw, "skip_duplicates": raw, "follow_symlinks": raw}
    config = parse_config(data, source=None, env=env)
    assert (config.recursive, config.skip_duplicates, config.follow_symlinks) == (expected,) * 3


def test_underscore_keys_are_ignored_at_any_depth(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["_comment"] = "top"
    data["credentials"]["_comment"] = "in credentials"
    data["threshold"]["_why"] = {"nested": ["deep"]}
    data["model"]["strategy"] = {"max_iter": 10, "_comment": "in the pass-through object"}
    data["folders"] = [str(images)]
    data["_batch_size"] = "not even checked"
    config = parse_config(data, source=None, env=env)
    assert config.warnings == ()
    assert dict(config.strategy) == {"max_iter": 10}
    assert dict(config.categories) == {"buildings": "buildings"}
    assert config.batch_size == 20


def test_unknown_keys_warn_with_suggestion(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["threshold"]["uplaod"] = 4
    data["batchsize"] = 5
    data["credentials"]["pasword"] = SECRET
    data["verify"] = False  # belongs in credentials
    data["colour"] = "blue"
    config = parse_config(data, source=Path("configuration.json"), env=env)
    assert config.warnings == (
        'configuration.json: credentials.pasword: unknown key, ignored (did you mean "password"?)',
        'configuration.json: threshold.uplaod: unknown key, ignored (did you mean "upload"?)',
        'configuration.json: batchsize: unknown key, ignored (did you mean "batch_size"?)',
        'configuration.json: verify: unknown key, ignored (it belongs in "credentials.verify")',
        "configuration.json: colour: unknown key, ignored",
    )
    assert config.batch_size == 20


def test_warnings_accompany_errors(images: Path, env: dict[str, str]) -> None:
    # A misspelt required key: the did-you-mean is what tells the user how to fix the error.
    data = seed(images)
    data["dataset"] = {"nmae": "classifier"}
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=Path("configuration.json"), env=env)
    assert info.value.problems == (
        "configuration.json: dataset.name: missing; the name of the dataset to upload to",
    )
    assert info.value.warnings == (
        'configuration.json: dataset.nmae: unknown key, ignored (did you mean "name"?)',
    )
    assert str(info.value) == info.value.problems[0]


def test_duplicate_keys_warn(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    text = json.dumps(seed(images))[:-1] + ', "time": 20, "time": 30}'
    path = tmp_path / "configuration.json"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    config = load_config(path, env=env)
    assert config.quiet_time == 30.0
    assert config.warnings == (
        "configuration.json: time: given more than once; the last one is used",
    )


# --- paths ------------------------------------------------------------------------------


def test_relative_folders_resolve_against_the_config_directory(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "images" / "a").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    data = seed(conf_dir) | {"folders": ["images/a", "../etc/images/b"]}
    path = write(conf_dir / "configuration.json", data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert info.value.problems == (
        f"configuration.json: folders[1]: folder {conf_dir / 'images' / 'b'} does not exist",
    )
    (conf_dir / "images" / "b").mkdir()
    config = load_config(path, env=env)
    assert config.folders == (
        (conf_dir / "images" / "a").resolve(),
        (conf_dir / "images" / "b").resolve(),
    )


def test_tilde_is_expanded(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "home" / "pics").mkdir(parents=True)
    data = seed(tmp_path) | {"folders": ["~/pics"], "ledger": "~/l.sqlite3"}
    config = parse_config(data, source=None, env=env)
    assert config.folders == ((tmp_path / "home" / "pics").resolve(),)
    assert config.ledger_path == tmp_path / "home" / "l.sqlite3"


@pytest.mark.parametrize(
    ("extra_env", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/paiv-sync"}, "/var/lib/paiv-sync/site.ledger.sqlite3"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a/site.ledger.sqlite3"),
        ({"XDG_STATE_HOME": "/xdg"}, "/xdg/paiv-sync/site.ledger.sqlite3"),
        ({"XDG_STATE_HOME": "relative"}, "HOME/.local/state/paiv-sync/site.ledger.sqlite3"),
        ({}, "HOME/.local/state/paiv-sync/site.ledger.sqlite3"),
    ],
)
def test_default_ledger_path(
    tmp_path: Path, images: Path, env: dict[str, str], extra_env: dict[str, str], expected: str
) -> None:
    config = load_config(write(tmp_path / "site.json", seed(images)), env=env | extra_env)
    digest = hashlib.sha256(str(tmp_path / "site.json").encode()).hexdigest()[:10]
    wanted = expected.replace("HOME", env["HOME"]).replace("site.", f"site-{digest}.")
    assert config.ledger_path == Path(wanted)
    assert config.ledger_shared_before is None


def test_configurations_of_one_file_name_get_their_own_default_ledgers(
    tmp_path: Path, images: Path, env: dict[str, str]
) -> None:
    paths = []
    for station in ("cam1", "cam2"):
        (tmp_path / station).mkdir()
        config = load_config(write(tmp_path / station / "site.json", seed(images)), env=env)
        paths.append(config.ledger_path)
    assert paths[0] != paths[1] and paths[0].parent == paths[1].parent


# --- secrets ----------------------------------------------------------------------------


def test_password_precedence(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    secret_file = tmp_path / "password.txt"
    secret_file.write_text("from-file\n", encoding="utf-8")
    data = seed(images)
    data["credentials"]["password"] = "from-value"

    def password(data: dict[str, Any], env: dict[str, str]) -> str | None:
        path = write(tmp_path / "configuration.json", data)
        return load_config(path, env=env).password

    assert password(data, env) == "from-value"
    data["credentials"]["password_file"] = "password.txt"  # relative to the config file
    assert password(data, env) == "from-file"
    env_with = env | {"PAIV_PASSWORD": "from-env"}
    assert password(data, env_with) == "from-env"


def test_systemd_credentials_directory(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    data = seed(images)
    del data["credentials"]["password"]
    env = env | {"CREDENTIALS_DIRECTORY": str(creds)}

    with pytest.raises(ConfigError, match="no password and no API key"):
        parse_config(data, source=None, env=env)

    (creds / "password").write_text("from-systemd\n", encoding="utf-8")
    config = parse_config(data, source=None, env=env)
    assert (config.auth_mode, config.password) == ("password", "from-systemd")
    # The environment variable still beats a systemd credential.
    assert parse_config(data, source=None, env=env | {"PAIV_PASSWORD": "e"}).password == "e"

    (creds / "password").unlink()
    (creds / "api_key").write_text(API_KEY, encoding="utf-8")
    data["credentials"].pop("username")
    config = parse_config(data, source=None, env=env)
    assert (config.auth_mode, config.api_key, config.password) == ("api_key", API_KEY, None)


def test_api_key_file(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    (tmp_path / "key").write_text(f"  {API_KEY}  \n", encoding="utf-8")
    data = seed(images)
    data["credentials"] = {"endpoint": "https://route", "api_key_file": str(tmp_path / "key")}
    config = parse_config(data, source=None, env=env)
    assert (config.auth_mode, config.api_key) == ("api_key", API_KEY)

    data["credentials"]["api_key_file"] = str(tmp_path / "nope")
    assert problems(data, env) == [
        f"configuration.json: credentials.api_key_file: the file {tmp_path / 'nope'} does not exist"
    ]


def test_both_password_and_api_key(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    assert problems(data, env | {"PAIV_API_KEY": API_KEY}) == [
        "configuration.json: credentials: both a password (from credentials.password) and an "
        "API key (from $PAIV_API_KEY) are set; keep only one"
    ]


def test_neither_password_nor_api_key(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    del data["credentials"]["password"]
    [line] = problems(data, env)
    assert line.startswith("configuration.json: credentials: no password and no API key; ")


def test_template_placeholders_are_a_clear_error(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["credentials"] |= {"username": "<username>", "password": "<password>"}
    assert problems(data, env) == [
        "configuration.json: credentials.username: still holds the template placeholder; "
        "give the real user name",
        "configuration.json: credentials.password: still holds the template placeholder; "
        "give the real value",
    ]
    # Only the placeholder is reported, not also "both a password and an API key".
    data["credentials"]["username"] = "admin"
    assert problems(data, env | {"PAIV_API_KEY": API_KEY}) == [
        "configuration.json: credentials.password: still holds the template placeholder; "
        "give the real value",
    ]


def test_secrets_never_appear_in_messages(
    tmp_path: Path, images: Path, env: dict[str, str]
) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET, encoding="utf-8")
    data = seed(images)
    data["credentials"] |= {
        "endpoint": f"https://admin:{SECRET}@host/api",
        "api_key": API_KEY,
        "pasword": SECRET,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data, source=None, env=env | {"PAIV_PASSWORD": SECRET})
    text = "\n".join(info.value.problems + info.value.warnings)
    assert "credentials.endpoint: the endpoint must not contain a user name or password" in text
    assert "both a password (from $PAIV_PASSWORD) and an API key" in text
    assert "credentials.pasword: unknown key" in text
    assert SECRET not in text and API_KEY not in text

    # Wrong types for the secret keys say the type, never the value.
    data = seed(images)
    data["credentials"]["password"] = [SECRET]
    data["credentials"]["api_key"] = {"k": API_KEY}
    text = "\n".join(problems(data, env))
    assert "credentials.password: must be a string, got a list" in text
    assert "credentials.api_key: must be a string, got an object" in text
    assert SECRET not in text and API_KEY not in text

    # Nor in the repr of a loaded configuration, nor in its warnings.
    config = load_config(write(tmp_path / "c.json", seed(images), 0o644), env=env)
    assert SECRET not in repr(config)
    assert config.warnings and SECRET not in "\n".join(config.warnings)


def test_permission_warning(tmp_path: Path, images: Path, env: dict[str, str]) -> None:
    if os.name != "posix":
        pytest.skip("file modes are a POSIX notion")
    path = write(tmp_path / "configuration.json", seed(images), 0o640)
    assert load_config(path, env=env).warnings == (
        "configuration.json: credentials.password: a plaintext secret in a file that group or "
        f"others can access (mode 0640); run chmod 600 {path}, or move it to password_file or "
        "$PAIV_PASSWORD",
    )
    path.chmod(0o600)
    assert load_config(path, env=env).warnings == ()
    # No secret in the file, nothing to warn about.
    data = seed(images)
    del data["credentials"]["password"]
    path = write(tmp_path / "configuration.json", data, 0o644)
    assert load_config(path, env=env | {"PAIV_PASSWORD": SECRET}).warnings == ()


# --- the template -----------------------------------------------------------------------


def _filled_template(images: Path) -> dict[str, Any]:
    data = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    data["credentials"] |= {"username": "admin", "password": SECRET}
    data["folders"] = [str(images)]
    return data


def test_template_is_the_seed_format(images: Path, env: dict[str, str]) -> None:
    template = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    with pytest.raises(ConfigError) as info:
        parse_config(template, source=Path("configuration.json"), env=env)
    assert any("placeholder" in line for line in info.value.problems)

    config = parse_config(_filled_template(images), source=None, env=env)
    assert config.base_url == "https://host:8000/powerai-vision/api"
    assert config.warnings == ()


def test_template_optional_keys_are_real_keys(images: Path, env: dict[str, str]) -> None:
    """Removing the underscore from each sample key gives a valid file with no warnings."""

    def enable(obj: dict[str, Any]) -> dict[str, Any]:
        return {
            (k[1:] if k.startswith("_") and not k.startswith("_comment") else k): v
            for k, v in obj.items()
            if k != "_api_key"  # the alternative to the password, not an addition
        }

    data = enable(_filled_template(images))
    data["credentials"] = enable(data["credentials"])
    before = copy.deepcopy(data)
    config = parse_config(data, source=None, env=env)
    assert data == before
    assert config.warnings == ()
    assert config.ledger_path == Path(data["ledger"])


def test_config_error_lines() -> None:
    error = ConfigError(["a: b: c", "a: d: e"], ["a: f: unknown key, ignored"])
    assert error.problems == ("a: b: c", "a: d: e")
    assert error.warnings == ("a: f: unknown key, ignored",)
    assert str(error) == "a: b: c\na: d: e"


def test_retry_policy_keys(tmp_path: Path) -> None:
    base = {
        "credentials": {"endpoint": "https://host/api", "username": "u", "password": "p"},
        "dataset": {"name": "d"},
        "folders": [str(tmp_path)],
        "ledger": str(tmp_path / "l.sqlite3"),
    }
    default = parse_config(base, source=None, env={})
    assert (default.retry_initial, default.retry_maximum) == (1.0, 60.0)
    tuned = parse_config({**base, "retry": {"initial": 0.5, "maximum": 5}}, source=None, env={})
    assert (tuned.retry_initial, tuned.retry_maximum) == (0.5, 5.0)
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {**base, "retry": {"initial": 10, "maximum": 5, "max": 1}}, source=None, env={}
        )
    assert "retry.maximum: must be at least retry.initial (10)" in str(caught.value)


# --- the table of keys ------------------------------------------------------------------


def test_every_key_of_the_table_is_read_and_documented(images: Path, env: dict[str, str]) -> None:
    from paiv_sync.configkeys import KEYS, SECTIONS

    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for dotted, default in KEYS.items():
        section, _, name = dotted.rpartition(".")
        # The credentials table names its keys without the section.
        assert f"`{dotted}`" in doc or (section == "credentials" and f"`{name}`" in doc), dotted
        if not isinstance(default, (bool, int, float, str, tuple)):
            continue  # REQUIRED, DERIVED, ABSENT: the seed gives the keys that need a value
        data = seed(images)
        node = data.setdefault(section, {}) if section else data
        node[name] = list(default) if isinstance(default, tuple) else default
        if dotted == "threshold.train":
            del node["training"]  # its alias: both with different values are an error
        config = parse_config(data, source=None, env=env)
        assert not [w for w in config.warnings if "unknown key" in w], dotted
    assert set(SECTIONS[""]) >= {"credentials", "threshold", "dataset", "model", "retry"}


def test_defaults_come_from_the_table(images: Path, env: dict[str, str]) -> None:
    from paiv_sync.configkeys import KEYS

    data = seed(images)
    data["threshold"] = {}
    config = parse_config(data, source=None, env=env)
    assert config.upload_threshold == KEYS["threshold.upload"]
    assert config.training_threshold == KEYS["threshold.training"]
    assert config.batch_size == KEYS["batch_size"]
    assert config.observer == KEYS["observer"]
    assert config.extensions == KEYS["extensions"]
    assert config.retry_maximum == KEYS["retry.maximum"]
    assert config.timeout == KEYS["credentials.timeout"]


def test_ignore_patterns_are_checked(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["ignore"] = ["rejects/", "", "*_raw.png"]
    assert parse_config(data, source=None, env=env).ignore == ("rejects/", "*_raw.png")
    data["ignore"] = ["ok/", "!"]
    assert problems(data, env) == [
        "configuration.json: ignore[1]: not a gitignore pattern (Invalid git pattern: '!')"
    ]
    data["ignore"] = "rejects/"
    assert problems(data, env) == [
        'configuration.json: ignore: must be a list of patterns such as ["rejects/"], '
        'got "rejects/"'
    ]


# --- the old script's files -------------------------------------------------------------


def test_a_port_key_beside_an_endpoint_with_its_own_port_is_ignored_with_a_warning(
    images: Path, env: dict[str, str]
) -> None:
    # The template's "port": "8000" left beside an endpoint that names its port: the old
    # script never read "port", so the endpoint's port is the one that worked.
    data = seed(images)
    data["credentials"]["endpoint"] = "https://host:8001/powerai-vision"
    config = parse_config(data, source=Path("configuration.json"), env=env)
    assert config.base_url == "https://host:8001/powerai-vision/api"
    assert config.warnings == (
        "configuration.json: credentials.port: ignored: the endpoint gives its own port 8001 "
        '(the port key says "8000"); remove one of them',
    )
    data["credentials"]["endpoint"] = "https://host:8000/powerai-vision"  # the same: no word
    assert parse_config(data, source=None, env=env).warnings == ()
    data["credentials"]["endpoint"] = "https://host/powerai-vision"  # none of its own: applies
    assert (
        parse_config(data, source=None, env=env).base_url == "https://host:8000/powerai-vision/api"
    )


def test_a_placeholder_endpoint_is_named_as_one(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["credentials"]["endpoint"] = "<url>"
    assert problems(data, env) == [
        'configuration.json: credentials.endpoint: the endpoint "<url>" still holds a template '
        "placeholder; give the URL"
    ]


def test_the_old_readmes_model_action_none_means_nothing(images: Path, env: dict[str, str]) -> None:
    data = seed(images)
    data["model"]["action"] = "none"
    assert parse_config(data, source=None, env=env).model_action == "nothing"


def test_placeholders_left_in_any_value_are_errors_with_their_key(
    images: Path, env: dict[str, str]
) -> None:
    data = seed(images)
    data["dataset"]["name"] = "<dataset_name>"
    data["model"]["name"] = "<name_of_model>"
    data["folders"] = ["<path>"]
    assert problems(data, env) == [
        'configuration.json: dataset.name: still holds the template placeholder "<dataset_name>"; '
        "give the real value",
        'configuration.json: model.name: still holds the template placeholder "<name_of_model>"; '
        "give the real value",
        'configuration.json: folders[0]: still holds the template placeholder "<path>"; '
        "give a folder",
    ]
