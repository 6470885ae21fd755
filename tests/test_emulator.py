"""The MVI emulator's API, driven over real HTTP on loopback with plain ``requests``."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from paiv_sync.emulator import Emulator, EmulatorOptions
from tests.helpers import wait_until

NOT_FOUND = {
    "status": "Not Found",
    "fault": "HTTP 404 Not Found",
    "type": "NotFoundException",
    "result": "fail",
}
TIMEOUT = 10


def jpeg(tag: str) -> bytes:
    """A body that passes for a JPEG (by its magic bytes), unique per ``tag``."""
    return b"\xff\xd8\xff\xe0" + tag.encode() + b"\x00" * 64


def png(tag: str) -> bytes:
    """A body that passes for a PNG, unique per ``tag``."""
    return b"\x89PNG\r\n\x1a\n" + tag.encode() + b"\x00" * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def login(emu: Emulator, session: requests.Session) -> None:
    response = session.post(
        f"{emu.url}/tokens",
        json={"grant_type": "password", "username": "admin", "password": "passw0rd"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    session.headers["X-Auth-Token"] = response.json()["token"]


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(EmulatorOptions(training_seconds=0.3)) as emulator:
        yield emulator


@pytest.fixture
def api(emu: Emulator) -> Iterator[requests.Session]:
    """A session already holding a token for ``emu``."""
    with requests.Session() as session:
        login(emu, session)
        yield session


def new_dataset(emu: Emulator, api: requests.Session, name: str = "ds") -> str:
    response = api.post(f"{emu.url}/datasets", json={"name": name}, timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert body["result"] == "success"
    return str(body["dataset_id"])


def upload(
    emu: Emulator,
    api: requests.Session,
    dataset_id: str,
    files: list[tuple[str, bytes]],
    **fields: str,
) -> dict[str, Any]:
    response = api.post(
        f"{emu.url}/datasets/{dataset_id}/files",
        files=[("files", (name, data)) for name, data in files],
        data=fields,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stored_files(emu: Emulator, dataset_id: str) -> list[dict[str, Any]]:
    for dataset in emu.state()["datasets"]:
        if dataset["_id"] == dataset_id:
            files: list[dict[str, Any]] = dataset["files"]
            return files
    raise AssertionError(f"dataset {dataset_id} not on the server")


# ---- authentication ------------------------------------------------------------------------


def test_password_login_issues_a_token_that_authenticates(emu: Emulator) -> None:
    with requests.Session() as session:
        response = session.post(
            f"{emu.url}/tokens",
            json={"grant_type": "password", "username": "admin", "password": "passw0rd"},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        body = response.json()
        assert body["result"] == "success" and body["token"]
        ok = session.get(
            f"{emu.url}/datasets", headers={"X-Auth-Token": body["token"]}, timeout=TIMEOUT
        )
        assert ok.status_code == 200 and ok.json() == []
    assert emu.state()["tokens_issued"] == 1


@pytest.mark.parametrize(
    ("headers", "fault_part"),
    [({}, "Missing"), ({"X-Auth-Token": "not-a-token"}, "Invalid")],
)
def test_calls_without_a_valid_token_get_401(
    emu: Emulator, headers: dict[str, str], fault_part: str
) -> None:
    response = requests.get(f"{emu.url}/datasets", headers=headers, timeout=TIMEOUT)
    assert response.status_code == 401
    body = response.json()
    assert body["result"] == "fail" and fault_part in body["fault"]


def test_wrong_password_gets_401_fail_body_and_no_token(emu: Emulator) -> None:
    response = requests.post(
        f"{emu.url}/tokens",
        json={"grant_type": "password", "username": "admin", "password": "wrong"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    body = response.json()
    assert body["result"] == "fail" and "token" not in body
    assert "wrong" not in body["fault"]
    assert emu.state()["tokens_issued"] == 0


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b'{"grant_type": "client", "username": "admin", "password": "passw0rd"}'],
)
def test_malformed_token_requests_get_400(emu: Emulator, payload: bytes) -> None:
    response = requests.post(
        f"{emu.url}/tokens",
        data=payload,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert response.json()["result"] == "fail"


def test_tokens_expire_after_their_lifetime() -> None:
    with (
        Emulator(EmulatorOptions(token_lifetime=1.0)) as emu,
        requests.Session() as session,
    ):
        login(emu, session)
        assert session.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 200
        expired = wait_until(
            lambda: session.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 401,
            timeout=5,
        )
        assert expired
        response = session.get(f"{emu.url}/datasets", timeout=TIMEOUT)
        assert response.json() == {"result": "fail", "fault": "Invalid or revoked token"}
        login(emu, session)  # a fresh token works again
        assert session.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 200


def test_token_lifetime_can_change_at_run_time(emu: Emulator, api: requests.Session) -> None:
    assert api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 200
    response = requests.post(
        f"{emu.root_url}/_emulator/options", json={"token_lifetime": 0.01}, timeout=TIMEOUT
    )
    assert response.status_code == 200
    wait_until(lambda: api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 401)


def test_revoked_tokens_stop_working(emu: Emulator, api: requests.Session) -> None:
    assert api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 200
    emu.revoke_tokens()
    assert api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 401
    login(emu, api)
    response = requests.post(
        f"{emu.root_url}/_emulator/revoke", json={"tokens": True}, timeout=TIMEOUT
    )
    assert response.json()["tokens_revoked"] == 1
    assert api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 401


def test_api_key_mode_has_no_tokens_endpoint_and_keys_can_be_revoked() -> None:
    options = EmulatorOptions(api_keys=("key-one", "key-two"))
    with Emulator(options) as emu:
        tokens = requests.post(
            f"{emu.url}/tokens",
            json={"grant_type": "password", "username": "admin", "password": "passw0rd"},
            timeout=TIMEOUT,
        )
        assert tokens.status_code == 404 and tokens.json() == NOT_FOUND
        for key in ("key-one", "key-two"):
            response = requests.get(
                f"{emu.url}/datasets", headers={"X-Auth-Token": key}, timeout=TIMEOUT
            )
            assert response.status_code == 200
        revoke = requests.post(
            f"{emu.root_url}/_emulator/revoke", json={"api_key": "key-one"}, timeout=TIMEOUT
        )
        assert revoke.status_code == 200
        refused = requests.get(
            f"{emu.url}/datasets", headers={"X-Auth-Token": "key-one"}, timeout=TIMEOUT
        )
        assert refused.status_code == 401 and refused.json()["result"] == "fail"
        emu.revoke_api_key("key-two")
        refused = requests.get(
            f"{emu.url}/datasets", headers={"X-Auth-Token": "key-two"}, timeout=TIMEOUT
        )
        assert refused.status_code == 401
        with pytest.raises(KeyError):
            emu.revoke_api_key("key-two")
        # Reset clears state, revocations included: the configured keys work again.
        emu.reset()
        restored = requests.get(
            f"{emu.url}/datasets", headers={"X-Auth-Token": "key-one"}, timeout=TIMEOUT
        )
        assert restored.status_code == 200


# ---- routes and error shapes -------------------------------------------------------------


def test_unknown_routes_ids_and_methods_get_the_404_body(
    emu: Emulator, api: requests.Session
) -> None:
    for method, path in [
        ("GET", "/nothing-here"),
        ("GET", "/datasets/no-such-id"),
        ("GET", "/datasets/no-such-id/categories"),
        ("GET", "/datasets/no-such-id/files"),
        ("GET", "/dltasks/no-such-id"),
        ("DELETE", "/datasets"),
    ]:
        response = api.request(method, f"{emu.url}{path}", timeout=TIMEOUT)
        assert response.status_code == 404, (method, path)
        assert response.json() == NOT_FOUND
    outside = api.get(f"{emu.root_url}/datasets", timeout=TIMEOUT)
    assert outside.status_code == 404 and outside.json() == NOT_FOUND


def test_trailing_slashes_are_accepted(emu: Emulator, api: requests.Session) -> None:
    created = api.post(f"{emu.url}/datasets/", json={"name": "slash"}, timeout=TIMEOUT)
    dataset_id = created.json()["dataset_id"]
    for path in ["/datasets/", f"/datasets/{dataset_id}/", f"/datasets/{dataset_id}/files/"]:
        assert api.get(f"{emu.url}{path}", timeout=TIMEOUT).status_code == 200, path
    assert api.get(f"{emu.url}/dltasks/", timeout=TIMEOUT).json() == []
    assert requests.get(f"{emu.root_url}/_emulator/state/", timeout=TIMEOUT).status_code == 200
    assert emu.state()["requests"]["GET /datasets/{id}"] == 1


def test_malformed_json_gets_400_fail_body(emu: Emulator, api: requests.Session) -> None:
    for path in ["/datasets", "/dltasks"]:
        response = api.post(f"{emu.url}{path}", data=b"{oops", timeout=TIMEOUT)
        assert response.status_code == 400
        body = response.json()
        assert body["result"] == "fail" and "JSON" in body["fault"]


def test_a_custom_base_path_moves_the_api_but_not_introspection() -> None:
    with Emulator(EmulatorOptions(base_path="/powerai-vision/api/")) as emu:
        assert emu.url.endswith("/powerai-vision/api")
        with requests.Session() as session:
            login(emu, session)
            assert session.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 200
            stray = session.get(f"{emu.root_url}/api/datasets", timeout=TIMEOUT)
            assert stray.status_code == 404
        assert requests.get(f"{emu.root_url}/_emulator/state", timeout=TIMEOUT).ok


def test_chunked_request_bodies_are_read(emu: Emulator, api: requests.Session) -> None:
    response = api.post(
        f"{emu.url}/datasets",
        data=iter([b'{"name": ', b'"chunked"}']),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert [d["name"] for d in emu.state()["datasets"]] == ["chunked"]


# ---- datasets and categories ---------------------------------------------------------------


def test_datasets_are_created_listed_newest_first_and_fetched(
    emu: Emulator, api: requests.Session
) -> None:
    first = new_dataset(emu, api, "first")
    second = new_dataset(emu, api, "second")
    listing = api.get(f"{emu.url}/datasets", timeout=TIMEOUT).json()
    assert [d["_id"] for d in listing] == [second, first]
    assert {"_id", "name", "total_file_count", "created_at"} <= set(listing[0])
    one = api.get(f"{emu.url}/datasets/{first}", timeout=TIMEOUT).json()
    assert one["name"] == "first" and one["total_file_count"] == 0
    missing_name = api.post(f"{emu.url}/datasets", json={}, timeout=TIMEOUT)
    assert missing_name.status_code == 400 and missing_name.json()["result"] == "fail"


def test_categories_are_created_and_listed(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    url = f"{emu.url}/datasets/{dataset_id}/categories"
    created = api.post(url, json={"name": "forest"}, timeout=TIMEOUT).json()
    assert created["result"] == "success"
    listing = api.get(url, timeout=TIMEOUT).json()
    assert listing == [
        {
            "_id": created["dataset_category_id"],
            "dataset_id": dataset_id,
            "name": "forest",
            "created_at": listing[0]["created_at"],
        }
    ]
    again = api.post(url, json={"name": "forest"}, timeout=TIMEOUT)
    assert again.status_code == 400 and "already exists" in again.json()["fault"]
    unknown = api.post(f"{emu.url}/datasets/nope/categories", json={"name": "x"}, timeout=TIMEOUT)
    assert unknown.status_code == 404 and unknown.json() == NOT_FOUND


def test_deleting_a_dataset_on_the_server_makes_it_404(
    emu: Emulator, api: requests.Session
) -> None:
    kept, dropped, gone = (new_dataset(emu, api, n) for n in ("kept", "dropped", "gone"))
    response = requests.delete(f"{emu.root_url}/_emulator/datasets/{dropped}", timeout=TIMEOUT)
    assert response.status_code == 200
    emu.delete_dataset(gone)
    assert api.get(f"{emu.url}/datasets/{dropped}", timeout=TIMEOUT).status_code == 404
    assert [d["_id"] for d in api.get(f"{emu.url}/datasets", timeout=TIMEOUT).json()] == [kept]
    again = requests.delete(f"{emu.root_url}/_emulator/datasets/{dropped}", timeout=TIMEOUT)
    assert again.status_code == 404
    with pytest.raises(KeyError):
        emu.delete_dataset(gone)


# ---- files ---------------------------------------------------------------------------------


def test_upload_stores_images_and_fails_other_files_one_by_one(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    bodies = [("a.jpg", jpeg("a")), ("notes.jpg", b"plain text"), ("b.png", png("b"))]
    body = upload(emu, api, dataset_id, bodies, category_name="forest")
    assert body["result"] == "success"
    entries = body["resultList"]
    assert [e["result"] for e in entries] == ["success", "fail", "success"]
    assert entries[1]["original_file_name"] == "notes.jpg" and entries[1]["fault"]
    stored = stored_files(emu, dataset_id)
    assert [(f["_id"], f["original_file_name"]) for f in stored] == [
        (entries[0]["_id"], "a.jpg"),
        (entries[2]["_id"], "b.png"),
    ]
    assert [f["sha256"] for f in stored] == [sha(bodies[0][1]), sha(bodies[2][1])]
    assert [f["content_type"] for f in stored] == ["image/jpeg", "image/png"]
    assert {f["category_name"] for f in stored} == {"forest"}
    listing = api.get(f"{emu.url}/datasets/{dataset_id}/files", timeout=TIMEOUT).json()
    assert [f["original_file_name"] for f in listing] == ["a.jpg", "b.png"]
    assert "sha256" not in listing[0]
    assert {"_id", "file_type", "dataset_id", "size", "created_at", "category_id"} <= set(
        listing[0]
    )
    dataset = api.get(f"{emu.url}/datasets/{dataset_id}", timeout=TIMEOUT).json()
    assert dataset["total_file_count"] == 2
    assert emu.state()["requests"]["POST /datasets/{id}/files"] == 1


@pytest.mark.parametrize(
    "category_part",
    [
        pytest.param(("category_name", (None, "desert")), id="text-field"),
        pytest.param(("category_name", ("category_name", "desert")), id="part-with-filename"),
    ],
)
def test_category_name_is_read_from_text_fields_and_from_parts_with_a_filename(
    emu: Emulator, api: requests.Session, category_part: tuple[str, Any]
) -> None:
    dataset_id = new_dataset(emu, api)
    # The category part after the files: the order of parts must not matter.
    parts = [("files", ("d.jpg", jpeg("d"))), category_part]
    response = api.post(f"{emu.url}/datasets/{dataset_id}/files", files=parts, timeout=TIMEOUT)
    assert response.json()["resultList"][0]["result"] == "success"
    (stored,) = stored_files(emu, dataset_id)
    assert stored["category_name"] == "desert"
    categories = api.get(f"{emu.url}/datasets/{dataset_id}/categories", timeout=TIMEOUT).json()
    assert [(c["_id"], c["name"]) for c in categories] == [(stored["category_id"], "desert")]


def test_upload_by_category_id_and_an_unknown_id_fails_every_file(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    category_id = api.post(
        f"{emu.url}/datasets/{dataset_id}/categories", json={"name": "sea"}, timeout=TIMEOUT
    ).json()["dataset_category_id"]
    good = upload(emu, api, dataset_id, [("s.jpg", jpeg("s"))], category_id=category_id)
    assert good["resultList"][0]["result"] == "success"
    bad = upload(
        emu, api, dataset_id, [("t.jpg", jpeg("t")), ("u.jpg", jpeg("u"))], category_id="nope"
    )
    assert [e["result"] for e in bad["resultList"]] == ["fail", "fail"]
    assert [f["category_name"] for f in stored_files(emu, dataset_id)] == ["sea"]


def test_a_zip_part_is_expanded_into_its_images(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    members = {f"folder/{i}.jpg": jpeg(f"zip{i}") for i in range(3)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("readme.txt", "not an image")
        archive.writestr("__MACOSX/folder/._0.jpg", "resource fork")
    body = upload(emu, api, dataset_id, [("batch.zip", buffer.getvalue())], category_name="z")
    entries = body["resultList"]
    assert [(e["result"], e["original_file_name"]) for e in entries] == [
        ("success", "0.jpg"),
        ("success", "1.jpg"),
        ("success", "2.jpg"),
        ("fail", "readme.txt"),
    ]
    stored = stored_files(emu, dataset_id)
    assert [f["sha256"] for f in stored] == [sha(d) for d in members.values()]
    broken = upload(emu, api, dataset_id, [("broken.zip", b"PK\x03\x04 not really")])
    assert broken["resultList"][0]["result"] == "fail"


def test_request_without_files_gets_400(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    url = f"{emu.url}/datasets/{dataset_id}/files"
    no_files = api.post(url, files={"category_name": (None, "x")}, timeout=TIMEOUT)
    assert no_files.status_code == 400 and no_files.json()["result"] == "fail"
    not_multipart = api.post(url, json={"files": []}, timeout=TIMEOUT)
    assert not_multipart.status_code == 400
    unknown = api.post(
        f"{emu.url}/datasets/nope/files", files={"files": ("a.jpg", jpeg("a"))}, timeout=TIMEOUT
    )
    assert unknown.status_code == 404 and unknown.json() == NOT_FOUND


def test_a_large_upload_is_hashed_whole(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    data = jpeg("big") + bytes(range(256)) * (8 * 4096)  # about 8 MiB
    body = upload(emu, api, dataset_id, [("big.jpg", data)])
    assert body["resultList"][0]["result"] == "success"
    (stored,) = stored_files(emu, dataset_id)
    assert (stored["size"], stored["sha256"]) == (len(data), sha(data))


def test_file_listing_filters_sorts_and_pages(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    upload(
        emu,
        api,
        dataset_id,
        [("cat-1.jpg", jpeg("1")), ("dog-2.jpg", jpeg("2"))],
        category_name="a",
    )
    upload(emu, api, dataset_id, [("cat-3.png", png("3") + b"longer")], category_name="b")
    url = f"{emu.url}/datasets/{dataset_id}/files"

    def names(**params: Any) -> list[str]:
        response = api.get(url, params=params, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return [f["original_file_name"] for f in response.json()]

    category_b = next(c for c in emu.state()["datasets"][0]["categories"] if c["name"] == "b")
    assert names() == ["cat-1.jpg", "dog-2.jpg", "cat-3.png"]
    assert names(category_id=category_b["_id"]) == ["cat-3.png"]
    assert names(query="CAT") == ["cat-1.jpg", "cat-3.png"]
    assert names(sortby="-original_file_name") == ["dog-2.jpg", "cat-3.png", "cat-1.jpg"]
    assert names(sortby="size", limit=1) == ["cat-1.jpg"]
    assert names(skip=1, limit=1) == ["dog-2.jpg"]
    for bad in ({"limit": "many"}, {"skip": "-1"}, {"sortby": "colour"}):
        response = api.get(url, params=bad, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["result"] == "fail", bad


def test_duplicates_are_stored_and_reported(emu: Emulator, api: requests.Session) -> None:
    dataset_id = new_dataset(emu, api)
    same = jpeg("same")
    first = upload(emu, api, dataset_id, [("x.jpg", same)], category_name="a")
    second = upload(emu, api, dataset_id, [("x-copy.jpg", same)], category_name="a")
    upload(emu, api, dataset_id, [("x.jpg", same)], category_name="b")  # other category
    (duplicate,) = emu.state()["duplicates"]
    assert duplicate == {
        "dataset_id": dataset_id,
        "category_name": "a",
        "sha256": sha(same),
        "count": 2,
        "file_ids": [first["resultList"][0]["_id"], second["resultList"][0]["_id"]],
    }


def test_concurrent_uploads_lose_nothing(emu: Emulator) -> None:
    with requests.Session() as setup:
        login(emu, setup)
        dataset_id = new_dataset(emu, setup)
    threads_count, requests_each, files_each = 6, 8, 3
    errors: list[str] = []

    def worker(index: int) -> None:
        with requests.Session() as session:
            login(emu, session)
            for request in range(requests_each):
                files = [
                    (f"w{index}-r{request}-f{n}.jpg", jpeg(f"{index}.{request}.{n}"))
                    for n in range(files_each)
                ]
                body = upload(emu, session, dataset_id, files, category_name=f"c{index % 2}")
                errors.extend(e["fault"] for e in body["resultList"] if e["result"] != "success")

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    assert not errors
    stored = stored_files(emu, dataset_id)
    expected = threads_count * requests_each * files_each
    assert len(stored) == expected
    assert len({f["sha256"] for f in stored}) == expected
    assert len({f["_id"] for f in stored}) == expected
    state = emu.state()
    assert [c["name"] for c in state["datasets"][0]["categories"]] in (["c0", "c1"], ["c1", "c0"])
    assert state["requests"]["POST /datasets/{id}/files"] == threads_count * requests_each
    assert state["duplicates"] == []


# ---- training ------------------------------------------------------------------------------


def fill(emu: Emulator, api: requests.Session, dataset_id: str, counts: dict[str, int]) -> None:
    for category, count in counts.items():
        files = [(f"{category}{i}.jpg", jpeg(f"{dataset_id}{category}{i}")) for i in range(count)]
        upload(emu, api, dataset_id, files, category_name=category)


def start_training(
    emu: Emulator, api: requests.Session, dataset_id: str, **extra: Any
) -> requests.Response:
    payload = {"name": "model", "dataset_id": dataset_id, "usage": "cic", "action": "create"}
    return api.post(f"{emu.url}/dltasks", json={**payload, **extra}, timeout=TIMEOUT)


def test_training_is_refused_below_the_minimum_with_what_is_missing(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    refused = start_training(emu, api, dataset_id)
    assert refused.status_code == 400 and "no categories" in refused.json()["fault"]
    fill(emu, api, dataset_id, {"forest": 5, "desert": 3})
    refused = start_training(emu, api, dataset_id)
    assert refused.status_code == 400
    fault = refused.json()["fault"]
    assert refused.json()["result"] == "fail"
    assert "desert: 3 images, needs 2 more" in fault and "forest: 5 images" in fault
    fill(emu, api, dataset_id, {"desert": 2})
    assert start_training(emu, api, dataset_id).status_code == 200
    unknown = start_training(emu, api, "no-such-dataset")
    assert unknown.status_code == 404 and unknown.json() == NOT_FOUND
    wrong_usage = start_training(emu, api, dataset_id, usage="cod")
    assert wrong_usage.status_code == 400


def test_training_runs_to_trained_and_retrains_from_a_trained_model(
    emu: Emulator, api: requests.Session
) -> None:
    # Long enough for the checks made while the first task trains, even on a slow machine.
    emu.set_options(training_seconds=1.5)
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"forest": 5, "desert": 5})
    started = start_training(emu, api, dataset_id, strategy={"max_iter": 10})
    assert started.status_code == 200 and started.json()["result"] == "success"
    task_id = started.json()["task_id"]
    task = api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).json()
    assert task["status"] == "training" and task["completed_at"] is None
    assert (task["dataset_id"], task["usage"], task["action"]) == (dataset_id, "cic", "create")
    assert task["strategy"] == {"max_iter": 10}
    running = api.get(f"{emu.url}/dltasks", params={"status": "training"}, timeout=TIMEOUT)
    assert [t["_id"] for t in running.json()] == [task_id]

    # A model still training cannot be the base of another one.
    early = start_training(emu, api, dataset_id, pretrained_model=task_id)
    assert early.status_code == 400 and "not trained" in early.json()["fault"]
    unknown = start_training(emu, api, dataset_id, pretrained_model="no-such-model")
    assert unknown.status_code == 400

    def status() -> str:
        return str(api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).json()["status"])

    wait_until(lambda: status() == "trained", timeout=10)
    assert api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).json()["completed_at"]
    retrain = start_training(emu, api, dataset_id, pretrained_model=task_id)
    assert retrain.status_code == 200
    listing = api.get(f"{emu.url}/dltasks", timeout=TIMEOUT).json()
    assert [t["_id"] for t in listing] == [retrain.json()["task_id"], task_id]
    assert listing[0]["pretrained_model"] == task_id
    state = emu.state()
    assert [t["status"] for t in state["tasks"]] == ["trained", "training"]
    assert state["concurrent_trainings_max"] == 1


def test_concurrent_trainings_are_accepted_and_counted(
    emu: Emulator, api: requests.Session
) -> None:
    emu.set_options(training_seconds=30)
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"a": 5, "b": 5})
    assert start_training(emu, api, dataset_id).status_code == 200
    assert start_training(emu, api, dataset_id).status_code == 200
    assert emu.state()["concurrent_trainings_max"] == 2


def test_training_can_be_made_to_fail(emu: Emulator, api: requests.Session) -> None:
    response = requests.post(
        f"{emu.root_url}/_emulator/options",
        json={"training_outcome": "failed", "training_seconds": 0},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"a": 5, "b": 5})
    task_id = start_training(emu, api, dataset_id).json()["task_id"]
    task = api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).json()
    assert task["status"] == "failed" and task["completed_at"]
    refused = start_training(emu, api, dataset_id, pretrained_model=task_id)
    assert refused.status_code == 400
    bad = requests.post(
        f"{emu.root_url}/_emulator/options", json={"training_outcome": "maybe"}, timeout=TIMEOUT
    )
    assert bad.status_code == 400


# ---- introspection -------------------------------------------------------------------------


def test_state_endpoint_matches_the_python_view_and_reset_clears_it(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    upload(emu, api, dataset_id, [("a.jpg", jpeg("a"))], category_name="forest")
    over_http = requests.get(f"{emu.root_url}/_emulator/state", timeout=TIMEOUT).json()
    assert over_http == emu.state()
    assert set(over_http) >= {
        "datasets",
        "tasks",
        "requests",
        "faults",
        "duplicates",
        "tokens_issued",
        "concurrent_trainings_max",
    }
    assert over_http["requests"] == {
        "POST /tokens": 1,
        "POST /datasets": 1,
        "POST /datasets/{id}/files": 1,
    }
    assert over_http["faults"] == dict.fromkeys(
        ("error", "drop", "store_then_drop", "rate_limit", "fail_in_200", "latency"), 0
    )
    reset = requests.post(f"{emu.root_url}/_emulator/reset", timeout=TIMEOUT)
    assert reset.status_code == 200
    cleared = emu.state()
    assert cleared["datasets"] == [] and cleared["requests"] == {}
    assert cleared["tokens_issued"] == 0
    # Tokens are state too: the old one is gone.
    assert api.get(f"{emu.url}/datasets", timeout=TIMEOUT).status_code == 401


def test_stop_closes_idle_keep_alive_connections(emu: Emulator) -> None:
    session = requests.Session()  # deliberately left open: stop() must still join its thread
    login(emu, session)
    assert session.get(f"{emu.url}/datasets", timeout=TIMEOUT).ok
    url = emu.url
    emu.stop()
    emu.stop()  # twice is harmless
    assert emu.url == url  # still known, for tests of a server that went away
    with pytest.raises(requests.ConnectionError):
        session.get(f"{url}/datasets", timeout=TIMEOUT)
    session.close()
    with pytest.raises(RuntimeError):
        _ = Emulator().url  # never started: no port yet
