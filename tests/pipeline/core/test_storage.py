"""`compute.storage` through pyarrow: folders put and got whole (commit files last, older files
dropped, no temporary file left), the prepared data shipped once per manifest and checked on the
node that fetches it, and locations validated from their text alone."""
import json

import pytest

from pipeline.core import storage
from pipeline.core.data import DataCorrupt
from pipeline.core.storage import Storage


@pytest.fixture(params=["uri", "path"])
def store(request, tmp_path):
    folder = tmp_path / "store"
    return Storage(f"file://{folder}" if request.param == "uri" else str(folder))


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_goes_and_comes_back_whole_commit_files_last(store, tmp_path, monkeypatch):
    local = tmp_path / "run"
    (local / "sub").mkdir(parents=True)
    files = {"latest.json": b"{}", "model.json": b"{}", "step-000010.safetensors": b"w" * 3000,
             "step-000010.json": b"{}", "sub/x.bin": b"x"}
    for rel, data in files.items():
        (local / rel).write_bytes(data)
    order = []
    put_file = Storage.put_file
    monkeypatch.setattr(Storage, "put_file", lambda self, src, key: (order.append(key), put_file(self, src, key)))
    store.put_dir(local, "checkpoints/run-abc")
    assert order[-2:] == ["checkpoints/run-abc/latest.json", "checkpoints/run-abc/model.json"]
    assert store.files("checkpoints/run-abc") == sorted(files) and store.folders("checkpoints") == ["run-abc"]

    (local / "step-000010.safetensors").unlink()  # the next step replaces it, as checkpoint.save does
    (local / "step-000010.json").unlink()
    (local / "step-000020.json").write_bytes(b"{}")
    store.put_dir(local, "checkpoints/run-abc")
    assert store.files("checkpoints/run-abc") == sorted(["latest.json", "model.json", "step-000020.json", "sub/x.bin"])

    back = tmp_path / "back"
    (back / "stale").mkdir(parents=True)  # whatever was there goes
    assert store.get_dir("checkpoints/run-abc", back)
    assert _tree(back) == _tree(local)
    assert not list((tmp_path / "store").rglob("*.tmp")) and not list(back.rglob("*.tmp"))
    assert store.read_json("checkpoints/run-abc/latest.json") == {} and store.read_bytes("nothing/here") is None
    store.remove("checkpoints/run-abc")
    assert store.folders("checkpoints") == [] and not store.get_dir("checkpoints/run-abc", back)


def test_prepared_data_is_shipped_once_and_checked_where_it_is_fetched(tiny_data, tmp_path, monkeypatch):
    store, cache = Storage(f"file://{tmp_path / 'store'}"), tmp_path / "node-cache"
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    key = storage.put_prepared(store, tiny_data, manifest)
    assert sorted(store.files(key)) == sorted([*manifest["files"], "manifest.json"])
    uploads = []
    monkeypatch.setattr(Storage, "put_file", lambda self, src, key: uploads.append(key))
    assert storage.put_prepared(store, tiny_data, manifest) == key and uploads == []  # already there
    monkeypatch.undo()

    local = storage.fetch_prepared(store, key, cache)
    assert local == cache / key and _tree(local) == _tree(tiny_data)
    train = local / "text" / "train.bin"
    train.write_bytes(train.read_bytes()[:-1])  # damaged on the node: fetched again
    assert _tree(storage.fetch_prepared(store, key, cache)) == _tree(tiny_data)

    (tmp_path / "store" / key / "text" / "train.bin").write_bytes(b"cut")  # damaged in storage: named
    other = tmp_path / "other-node"
    with pytest.raises(DataCorrupt, match="train.bin"):
        storage.fetch_prepared(store, key, other)
    with pytest.raises(FileNotFoundError, match="data/none/manifest.json: missing in compute.storage"):
        storage.fetch_prepared(store, "data/none", other)


@pytest.mark.parametrize("location, message", [
    ("", "empty"),
    ("s3:/bucket/x", "with two slashes"),
    ("ftp://host/x", "unknown scheme 'ftp'"),
    ("file://relative/x", "needs an absolute path"),
    ("gs://", "names no bucket or folder"),
])
def test_a_location_is_checked_from_its_text_alone(location, message):
    with pytest.raises(ValueError, match=message):
        storage.check(location)


@pytest.mark.parametrize("location", ["runs/train", "/mnt/nfs/kvf", "file:///mnt/x", "s3://bucket/prefix",
                                      "gs://bucket", "hdfs://namenode:8020/kvf"])
def test_good_locations_pass_unchanged_without_touching_a_network(location):
    assert storage.check(location) == location
