"""`compute.storage`: the folder where runs keep what they write, when the nodes share no filesystem.

It is a path (on a cluster, one every node sees at the same path, e.g. NFS) or a URI pyarrow
understands: `file:///abs/path`, `s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://host/path`.
Everything here goes through `pyarrow.fs`, so one code path serves them all.

- `check(location)` reads the text alone: it never builds a filesystem (pyarrow's S3 one may
  probe the network for a region), so a params file is validated offline.
- Files are copied one by one. Where the filesystem renames (local, HDFS) each is written under a
  temporary name and moved into place; an object store publishes an object whole when its upload
  ends. A folder is put and got with its commit file last (`manifest.json`, `latest.json`,
  `model.json`: what a reader trusts the folder by), so a cut copy is never taken for a whole one.
- The prepared data travels by its manifest: `put_prepared` (the driver, once per manifest, to
  `data/<digest of the manifest>`) and `fetch_prepared` (a worker, once per node, into a cache
  under its node's Ray temp dir, verified against the manifest before use).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow.fs.FileSystem.from_uri
COMMIT_FILES = ("manifest.json", "latest.json", "model.json")  # written last, in this order
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def is_uri(location: str) -> bool:
    return "://" in location


def check(location: str) -> str:
    """`location` unchanged, or ValueError saying what is wrong with it."""
    if not location.strip():
        raise ValueError("empty: give a path (runs/train) or a URI (file:///abs/path, s3://bucket/prefix)")
    scheme = _SCHEME.match(location)
    if scheme is None or len(scheme.group(1)) == 1:  # a path (a drive letter is not a scheme)
        return location
    name, rest = scheme.group(1).lower(), location[scheme.end():]
    if not rest.startswith("//"):
        raise ValueError(f"{location!r}: a URI is written {name}://..., with two slashes")
    if name not in SCHEMES:
        raise ValueError(f"{location!r}: unknown scheme {name!r} (pyarrow understands {', '.join(SCHEMES)})")
    if name == "file" and not rest.startswith("///"):
        raise ValueError(f"{location!r}: a file:// URI needs an absolute path: file:///abs/path")
    if not rest.strip("/"):
        raise ValueError(f"{location!r}: names no bucket or folder")
    return location


class Storage:
    """A folder of a pyarrow filesystem (`location`: an absolute path or a URI); keys are
    '/'-separated paths below it."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self._fs = self._base = None

    def _open(self):
        """(filesystem, base path), built on first use in the process that uses them."""
        import pyarrow.fs

        if self._fs is None:
            if is_uri(self.location):
                self._fs, self._base = pyarrow.fs.FileSystem.from_uri(self.location)
            else:
                self._fs, self._base = pyarrow.fs.LocalFileSystem(), str(Path(self.location).resolve())
        return self._fs, self._base.rstrip("/")

    @property
    def fs(self):
        return self._open()[0]

    def path(self, key: str) -> str:
        return f"{self._open()[1]}/{key}"

    def uri(self, key: str) -> str:
        """The key as a user reads it (in messages)."""
        return f"{self.location}/{key}"

    # ---------------------------------------------------------------- reading
    def _kind(self, key: str):
        return self.fs.get_file_info(self.path(key)).type

    def exists(self, key: str) -> bool:
        import pyarrow.fs

        return self._kind(key) != pyarrow.fs.FileType.NotFound

    def read_bytes(self, key: str) -> bytes | None:
        """The file's bytes, None when it is not there."""
        if not self.exists(key):
            return None
        with self.fs.open_input_stream(self.path(key)) as stream:
            return stream.read()

    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        return None if data is None else json.loads(data)

    def _listing(self, key: str, recursive: bool) -> list:
        import pyarrow.fs

        if self._kind(key) != pyarrow.fs.FileType.Directory:
            return []
        return self.fs.get_file_info(pyarrow.fs.FileSelector(self.path(key), recursive=recursive))

    def files(self, key: str) -> list[str]:
        """Every file below `key`, as paths relative to it ([] when there is no such folder)."""
        import pyarrow.fs

        root = len(self.path(key)) + 1
        return sorted(info.path[root:] for info in self._listing(key, recursive=True)
                      if info.type == pyarrow.fs.FileType.File)

    def folders(self, key: str) -> list[str]:
        """The names of the folders directly below `key`."""
        import pyarrow.fs

        return sorted(info.base_name for info in self._listing(key, recursive=False)
                      if info.type == pyarrow.fs.FileType.Directory)

    # ---------------------------------------------------------------- writing
    def _write(self, key: str, copy: Callable) -> None:
        """`copy(stream)` fills the file `key`: under a temporary name, then moved into place, where
        the filesystem renames; an object store's upload appears whole when its stream closes."""
        target = self.path(key)
        if self.fs.type_name not in ("local", "hdfs"):
            with self.fs.open_output_stream(target) as out:
                copy(out)
            return
        folder, name = target.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        temp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(temp) as out:
                copy(out)
            self.fs.move(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(temp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, local: Path, key: str) -> None:
        with open(local, "rb") as source:
            self._write(key, lambda out: shutil.copyfileobj(source, out, 1 << 20))

    def get_file(self, key: str, local: Path) -> None:
        """Copy `key` to the file `local` (a temporary name, then renamed)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        temp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.fs.open_input_stream(self.path(key)) as stream, open(temp, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
            os.replace(temp, local)
        finally:
            temp.unlink(missing_ok=True)

    def put_dir(self, local: Path, key: str) -> None:
        """Make `key` hold what the folder `local` holds: every file (its commit files last), then
        the files `local` no longer has are deleted (a checkpoint's older steps)."""
        here = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
        for rel in _commit_last(here):
            self.put_file(local / rel, f"{key}/{rel}")
        for rel in set(self.files(key)) - set(here):
            self.fs.delete_file(self.path(f"{key}/{rel}"))

    def get_dir(self, key: str, local: Path) -> bool:
        """Make the folder `local` a copy of `key` (its commit files last); False when `key` holds nothing."""
        shutil.rmtree(local, ignore_errors=True)
        there = self.files(key)
        for rel in _commit_last(there):
            self.get_file(f"{key}/{rel}", local / rel)
        return bool(there)

    def remove(self, key: str) -> None:
        """The file or folder `key`, gone (nothing when it is not there)."""
        import pyarrow.fs

        kind = self._kind(key)
        if kind == pyarrow.fs.FileType.File:
            self.fs.delete_file(self.path(key))
        elif kind == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self.path(key))


def _commit_last(files: list[str]) -> list[str]:
    rank = {name: i + 1 for i, name in enumerate(COMMIT_FILES)}
    return sorted(files, key=lambda rel: (rank.get(rel, 0), rel))


# -------------------------------------------------------------------- the prepared data
def put_prepared(store: Storage, data_dir: Path, manifest: dict) -> str:
    """Upload the prepared data (the manifest's files, then `manifest.json`) unless storage holds
    it already; returns its key, `data/<sha256 of manifest.json>`."""
    text = (Path(data_dir) / "manifest.json").read_bytes()
    key = f"data/{hashlib.sha256(text).hexdigest()[:16]}"
    if store.read_bytes(f"{key}/manifest.json") != text:
        for rel in manifest["files"]:
            store.put_file(Path(data_dir) / rel, f"{key}/{rel}")
        store.put_bytes(f"{key}/manifest.json", text)  # the commit point
    return key


def node_cache() -> Path:
    """This worker's node's own folder for what it fetches: `kvf-cache` in the node's Ray temp dir
    (`ray start --temp-dir`), shared by the workers of that node and by nothing else."""
    import ray._private.worker  # Ray 2.60 has no public accessor for a node's temp dir

    return Path(ray._private.worker.global_worker.node.get_temp_dir_path()) / "kvf-cache"


def fetch_prepared(store: Storage, key: str, cache: Path) -> Path:
    """The prepared data `key` in `cache` (copied from storage the first time on this node),
    checked against its manifest; raises DataCorrupt naming a damaged file."""
    from pipeline.core.data import DataCorrupt, verify_prepared

    local = cache / key
    if (local / "manifest.json").exists():
        try:
            verify_prepared(local)
            return local
        except DataCorrupt:  # damaged on this node: fetched again
            shutil.rmtree(local, ignore_errors=True)
    manifest = store.read_json(f"{key}/manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{store.uri(key)}/manifest.json: missing in compute.storage (the train "
                                f"stage uploads the prepared data there before any job starts)")
    incoming = local.with_name(f"{local.name}.incoming-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    for rel in manifest["files"]:
        store.get_file(f"{key}/{rel}", incoming / rel)
    store.get_file(f"{key}/manifest.json", incoming / "manifest.json")
    try:
        os.rename(incoming, local)  # atomic; fails when another worker of this node got there first
    except OSError:
        shutil.rmtree(incoming, ignore_errors=True)
    try:
        verify_prepared(local)
    except DataCorrupt as err:  # the copy in storage is damaged: the driver would skip re-uploading it
        shutil.rmtree(local, ignore_errors=True)
        raise DataCorrupt(f"{store.uri(key)}: not the bytes prepare wrote ({err}); delete that folder "
                          "and run the train stage again (it uploads the data anew)") from None
    return local
