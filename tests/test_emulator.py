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
from paiv_sync.images import make_png
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
    # No transient 500 as a task ends: these tests read raw answers (one test turns it on).
    with Emulator(EmulatorOptions(training_seconds=0.3, finishing_error_rate=0.0)) as emulator:
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
    expect: int = 200,
    **fields: str,
) -> dict[str, Any]:
    response = api.post(
        f"{emu.url}/datasets/{dataset_id}/files",
        files=[("files", (name, data)) for name, data in files],
        data=fields,
        timeout=TIMEOUT,
    )
    assert response.status_code == expect, response.text
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


def test_missing_objects_get_the_products_404_and_unmodelled_routes_501(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    for method, path, fault in [
        ("GET", "/datasets/no-such-id", "Could not find dataset no-such-id"),
        ("GET", "/datasets/no-such-id/categories", "Could not find dataset no-such-id"),
        ("GET", "/datasets/no-such-id/files", "Could not find dataset no-such-id"),
        ("DELETE", "/datasets/no-such-id", "Unknown dataset no-such-id"),
        ("GET", f"/datasets/{dataset_id}/files/123-def", "Could not find file 123-def"),
        ("GET", "/dltasks/no-such-id", "Could not find task no-such-id"),
        ("GET", "/trained-models/no-such-id", "Could not find trained model no-such-id"),
    ]:
        response = api.request(method, f"{emu.url}{path}", timeout=TIMEOUT)
        assert response.status_code == 404, (method, path)
        assert response.json() == {**NOT_FOUND, "fault": fault}
    for method, path in [("GET", "/nothing-here"), ("DELETE", "/datasets"), ("PUT", "/dltasks")]:
        response = api.request(method, f"{emu.url}{path}", timeout=TIMEOUT)
        assert response.status_code == 501, (method, path)
        assert response.json()["result"] == "fail"
        assert "does not implement" in response.json()["fault"]
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
    assert unknown.status_code == 404
    assert unknown.json()["fault"] == "Could not find dataset nope"


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
    bodies = [("a.jpg", jpeg("a")), ("notes.jpg", b"plain text"), ("b.png", make_png(8, 8))]
    # As the product answers [client]: a 400 with result: fail, and the good files stored.
    body = upload(emu, api, dataset_id, bodies, expect=400, category_name="forest")
    assert body["result"] == "fail" and body["fault"] == "1 of 3 files could not be uploaded"
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
    assert [f["original_file_name"] for f in listing] == ["b.png", "a.jpg"]  # newest first
    assert "sha256" not in listing[0]
    newest = listing[0]
    assert newest["size"] == str(len(bodies[2][1]))  # a string, as on the product [doc]
    assert isinstance(newest["created_at"], int) and newest["created_at"] > 1.6e12  # epoch ms
    assert newest["uploaded_at"] == newest["created_at"]
    assert newest["owner"] == "admin" and newest["file_name"] == f"{newest['_id']}.png"
    assert newest["meta_data"] == {"width": 8, "height": 8}
    assert {"file_type", "dataset_id", "category_id", "category_name", "tag_list"} <= set(newest)
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
        emu,
        api,
        dataset_id,
        [("t.jpg", jpeg("t")), ("u.jpg", jpeg("u"))],
        expect=400,
        category_id="nope",
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
    body = upload(
        emu, api, dataset_id, [("batch.zip", buffer.getvalue())], expect=400, category_name="z"
    )
    entries = body["resultList"]
    assert [(e["result"], e["original_file_name"]) for e in entries] == [
        ("success", "0.jpg"),
        ("success", "1.jpg"),
        ("success", "2.jpg"),
        ("fail", "readme.txt"),
    ]
    stored = stored_files(emu, dataset_id)
    assert [f["sha256"] for f in stored] == [sha(d) for d in members.values()]
    broken = upload(emu, api, dataset_id, [("broken.zip", b"PK\x03\x04 not really")], expect=400)
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
    assert unknown.status_code == 404
    assert unknown.json()["fault"] == "Could not find dataset nope"


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
    assert names() == ["cat-3.png", "dog-2.jpg", "cat-1.jpg"]  # newest first [client]
    assert names(sortby="created_at") == ["cat-1.jpg", "dog-2.jpg", "cat-3.png"]
    assert names(sortby="name") == ["cat-1.jpg", "cat-3.png", "dog-2.jpg"]
    assert names(sortby="name DESC") == ["dog-2.jpg", "cat-3.png", "cat-1.jpg"]
    assert names(sortby="-original_file_name") == ["dog-2.jpg", "cat-3.png", "cat-1.jpg"]
    assert names(sortby="category_name DESC, name") == ["cat-3.png", "cat-1.jpg", "dog-2.jpg"]
    assert names(category_id=category_b["_id"]) == ["cat-3.png"]
    assert names(query='original_file_name == "dog-2.jpg"') == ["dog-2.jpg"]
    assert names(query="original_file_name != dog-2.jpg", sortby="name") == [
        "cat-1.jpg",
        "cat-3.png",
    ]
    small = len(jpeg("1"))
    assert names(query=f"size <= {small}", sortby="name") == ["cat-1.jpg", "dog-2.jpg"]
    assert names(query=f"size > {small}, category_name == 'b'") == ["cat-3.png"]
    assert names(query=f"size > {small} and category_name == 'a'") == []
    assert names(sortby="size, name", limit=1) == ["cat-1.jpg"]
    assert names(sortby="created_at", skip=1, limit=1) == ["dog-2.jpg"]
    assert names(parent_id="none-such") == []
    for bad in (
        {"limit": "many"},
        {"skip": "-1"},
        {"sortby": "colour"},
        {"sortby": "name SIDEWAYS"},
        {"query": "CAT"},
        {"query": "size = 3"},
    ):
        response = api.get(url, params=bad, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["result"] == "fail", bad


def test_user_metadata_is_stored_from_the_upload_queried_and_edited(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    tagged = upload(
        emu,
        api,
        dataset_id,
        [("a.jpg", jpeg("a")), ("b.jpg", jpeg("b"))],
        category_name="x",
        **{"user-metadata": '{"station": "cam1", "batch": "7"}'},
    )
    upload(emu, api, dataset_id, [("c.jpg", jpeg("c"))], category_name="x")
    url = f"{emu.url}/datasets/{dataset_id}/files"
    found = api.get(url, params={"query": 'metadata.batch == "7"'}, timeout=TIMEOUT).json()
    assert sorted(f["_id"] for f in found) == sorted(e["_id"] for e in tagged["resultList"])
    assert "user_metadata" not in found[0]  # not a field of the file object
    first = tagged["resultList"][0]["_id"]
    meta_url = f"{url}/{first}/user-metadata"
    assert api.get(meta_url, timeout=TIMEOUT).json() == {"station": "cam1", "batch": "7"}
    assert api.post(meta_url, json={"inspection_date": 20210305}, timeout=TIMEOUT).ok
    later = api.get(url, params={"query": "metadata.inspection_date > 20210302"}, timeout=TIMEOUT)
    assert [f["_id"] for f in later.json()] == [first]
    deleted = api.delete(meta_url, json=["station", "nope"], timeout=TIMEOUT).json()
    assert deleted == ["station"]
    assert api.get(meta_url, timeout=TIMEOUT).json() == {"batch": "7", "inspection_date": 20210305}
    bad = api.post(
        url,
        files=[("files", ("d.jpg", jpeg("d")))],
        data={"user-metadata": "[1, 2]"},
        timeout=TIMEOUT,
    )
    assert bad.status_code == 400 and "user-metadata" in bad.json()["fault"]


def test_files_and_categories_are_shown_counted_and_deleted(
    emu: Emulator, api: requests.Session
) -> None:
    dataset_id = new_dataset(emu, api)
    body = upload(
        emu, api, dataset_id, [("a.jpg", jpeg("a")), ("b.jpg", jpeg("b"))], category_name="x"
    )
    first, second = (e["_id"] for e in body["resultList"])
    url = f"{emu.url}/datasets/{dataset_id}"
    shown = api.get(f"{url}/files/{first}", timeout=TIMEOUT).json()
    assert (shown["_id"], shown["original_file_name"], shown["dataset_id"]) == (
        first,
        "a.jpg",
        dataset_id,
    )
    (category,) = api.get(f"{url}/categories", timeout=TIMEOUT).json()
    cid = category["_id"]
    assert api.get(f"{url}/categories/{cid}", timeout=TIMEOUT).json()["name"] == "x"
    counted = api.post(
        f"{url}/categories/{cid}/action", json={"action": "calculate"}, timeout=TIMEOUT
    )
    assert counted.json()["size"] == 2
    assert api.delete(f"{url}/files/{first}", timeout=TIMEOUT).json()["result"] == "success"
    assert api.get(f"{url}/files/{first}", timeout=TIMEOUT).status_code == 404
    assert api.delete(f"{url}/categories/{cid}", timeout=TIMEOUT).json()["result"] == "success"
    (left,) = api.get(f"{url}/files", timeout=TIMEOUT).json()
    assert (left["_id"], left["category_id"]) == (second, None)
    assert api.delete(url, timeout=TIMEOUT).json()["result"] == "success"
    assert api.get(url, timeout=TIMEOUT).json()["fault"] == f"Could not find dataset {dataset_id}"


def test_the_lenient_option_answers_failed_files_inside_a_200(api: requests.Session) -> None:
    from paiv_sync.emulator.options import lenient

    with Emulator(lenient()) as kind:
        login(kind, api)
        dataset_id = new_dataset(kind, api)
        body = upload(kind, api, dataset_id, [("a.jpg", jpeg("a")), ("n.jpg", b"text")])
        assert body["result"] == "success"
        assert [e["result"] for e in body["resultList"]] == ["success", "fail"]


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
    assert unknown.status_code == 404
    assert unknown.json()["fault"] == "Could not find dataset no-such-dataset"
    wrong_usage = start_training(emu, api, dataset_id, usage="cod")
    assert wrong_usage.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"usage": "cic"}, id="usage-only-as-IBMs-library"),
        pytest.param({"action": "create"}, id="action-only-as-IBMs-old-demo"),
    ],
)
def test_dltasks_bodies_of_ibms_other_clients_are_classification(
    emu: Emulator, api: requests.Session, body: dict[str, str]
) -> None:
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"a": 5, "b": 5})
    payload = {"name": "m", "dataset_id": dataset_id, **body}
    accepted = api.post(f"{emu.url}/dltasks", json=payload, timeout=TIMEOUT)
    assert accepted.status_code == 200, accepted.text
    task = api.get(f"{emu.url}/dltasks/{accepted.json()['task_id']}", timeout=TIMEOUT).json()
    assert task["usage"] == "cic"
    with Emulator(EmulatorOptions(strict_tasks=True)) as strict:
        login(strict, api)
        strict_id = new_dataset(strict, api)
        fill(strict, api, strict_id, {"a": 5, "b": 5})
        refused = api.post(
            f"{strict.url}/dltasks", json={**payload, "dataset_id": strict_id}, timeout=TIMEOUT
        )
        assert refused.status_code == 400


def test_a_task_is_followed_as_ibms_clients_do_and_its_model_listed_and_deleted(
    emu: Emulator, api: requests.Session
) -> None:
    emu.set_options(training_seconds=0.5, finishing_error_rate=1.0)
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"a": 5, "b": 5})
    task_id = start_training(emu, api, dataset_id).json()["task_id"]
    assert api.get(f"{emu.url}/datasets/{dataset_id}", timeout=TIMEOUT).json()["locked"] == 1
    early = api.get(f"{emu.url}/dltasks/{task_id}/status", timeout=TIMEOUT).json()
    assert early["result"] == "success" and early["status"] == "training"
    assert set(early["data"][0]) == {"iter", "total_iter", "loss"}
    assert api.get(f"{emu.url}/trained-models", timeout=TIMEOUT).json() == []

    # As the task ends, the product answers its status with a transient 500 now and then.
    def finishing() -> bool:
        return api.get(f"{emu.url}/dltasks/{task_id}/status", timeout=TIMEOUT).status_code == 500

    wait_until(finishing, timeout=10, interval=0.01)
    assert emu.state()["faults"]["finishing_500"] >= 1
    emu.set_options(finishing_error_rate=0.0)
    assert api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).json()["status"] == "trained"
    assert api.get(f"{emu.url}/datasets/{dataset_id}", timeout=TIMEOUT).json()["locked"] == 0
    (model,) = api.get(f"{emu.url}/trained-models", timeout=TIMEOUT).json()
    assert (model["_id"], model["dataset_id"], model["usage"]) == (task_id, dataset_id, "cic")
    assert isinstance(model["accuracy"], str) and model["production_status"]
    assert api.get(f"{emu.url}/trained-models/{task_id}", timeout=TIMEOUT).json() == model
    assert api.delete(f"{emu.url}/trained-models/{task_id}", timeout=TIMEOUT).ok
    assert api.get(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).status_code == 404
    assert api.delete(f"{emu.url}/dltasks/{task_id}", timeout=TIMEOUT).status_code == 404


@pytest.mark.parametrize("mode", ["409", "423"])
def test_an_upload_into_a_locked_dataset_is_refused_when_so_configured(
    emu: Emulator, api: requests.Session, mode: str
) -> None:
    emu.set_options(training_seconds=30, locked_uploads=mode)
    dataset_id = new_dataset(emu, api)
    fill(emu, api, dataset_id, {"a": 5, "b": 5})
    assert start_training(emu, api, dataset_id).status_code == 200
    refused = upload(emu, api, dataset_id, [("late.jpg", jpeg("late"))], expect=int(mode))
    assert "locked" in refused["fault"]
    assert len(stored_files(emu, dataset_id)) == 10
    emu.set_options(locked_uploads="accept")
    upload(emu, api, dataset_id, [("late.jpg", jpeg("late"))], category_name="a")
    assert len(stored_files(emu, dataset_id)) == 11


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
    assert task["status"] == "training" and "completed_at" not in task  # not a real field
    assert (task["dataset_id"], task["usage"]) == (dataset_id, "cic")
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
    assert task["status"] == "failed"
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
