"""Reading a corpus: the formats (`txt`, `jsonl` and `jsonl.gz`, `parquet`, `hf_dataset`, the
built-in plays) cut into units of work, and each unit's documents as text, in corpus order.

A unit is a group of small files, a byte range of a large JSONL file, a parquet row group or a
row range of a dataset; `plan` makes them (checking every input before anything is written) and
`_documents` reads one in bounded chunks. Every problem in the input is a `CorpusError` naming
the file (and the line or row). The writer that streams units into split files:
`pipeline.prepare.corpus`.
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline.core.plays import PLAYS_SUFFIX, list_plays, plays_dir, read_play

UNIT_BYTES = 32 << 20        # input bytes per unit of work
CHUNK_BYTES = 8 << 20        # a txt document is read this much at a time
IN_PROCESS_BYTES = 64 << 20  # a smaller corpus is read in this process (no worker start-up)
BATCH_ROWS = 1024            # parquet / dataset rows decoded at a time
DEFAULT_GLOBS = {"txt": ("**/*.txt",), "jsonl": ("**/*.jsonl", "**/*.jsonl.gz"),
                 "parquet": ("**/*.parquet",)}



class CorpusError(ValueError):
    """An input the corpus cannot be read from; the message names the file (and line or row)."""


# --------------------------------------------------------------------------- units of work
@dataclass(frozen=True)
class Unit:
    """A piece of the corpus one worker reads: documents `first_doc` .. `first_doc + docs - 1`.

    `paths`/`names`: the files (txt, plays: several, one document each) or the one file (jsonl,
    parquet) or dataset folder, and their names. `start`/`stop`: a byte range (jsonl; stop None:
    to the end), a row group (parquet) or a row range (hf_dataset); `first_row`: the line (jsonl,
    from 1) or row (from 0) at `start`, for names and messages.
    """

    index: int
    format: str
    paths: tuple[str, ...]
    names: tuple[str, ...]
    nbytes: int
    start: int = 0
    stop: Optional[int] = None
    first_row: int = 0
    first_doc: int = 0
    docs: int = 0


@dataclass(frozen=True)
class _Spec:
    """What every unit's worker needs besides its unit."""

    text_field: str
    name_field: Optional[str]
    tokenizer: str
    shard_dir: str
    by_name: bool  # the split assignment is keyed by document name (listed), else by index (drawn)


def _files(corpus) -> tuple[Path, list[Path]]:
    """(root the names are relative to, the corpus's files sorted by that name)."""
    path = Path(corpus.path).expanduser()
    if not path.exists():
        raise CorpusError(f"{path}: no such file or folder (data.corpus.path)")
    if corpus.format == "hf_dataset":
        if not path.is_dir():
            raise CorpusError(f"{path}: not a folder written by save_to_disk (data.corpus.path)")
        return path, [path]
    if path.is_file():
        if corpus.glob:
            raise CorpusError(f"{path}: a file; data.corpus.glob needs a folder as data.corpus.path")
        return path.parent, [path]
    patterns = (corpus.glob,) if corpus.glob else DEFAULT_GLOBS[corpus.format]
    files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()},
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CorpusError(f"{path}: no file matches {' or '.join(patterns)} (data.corpus.glob)")
    return path, files


def _first_record(path: Path, spec: _Spec) -> None:
    """The first JSON line of a file, checked at once (a wrong field name fails before any work)."""
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                _record(line, f"{path}:{line_no}", spec)
                return
    raise CorpusError(f"{path}: empty file (no JSON lines)")


def _parquet_schema(path: Path, spec: _Spec):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several kinds for a file that is not parquet
        raise CorpusError(f"{path}: not a parquet file ({err})") from None
    schema = pf.schema_arrow
    for field in filter(None, (spec.text_field, spec.name_field)):
        if field not in schema.names:
            raise CorpusError(f"{path}: no column {field!r} (its columns: {', '.join(schema.names)}); "
                              f"set data.corpus.{'text' if field == spec.text_field else 'name'}_field")
    kind = schema.field(spec.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise CorpusError(f"{path}: column {spec.text_field!r} holds {kind}, not text")
    if pf.metadata.num_rows == 0:
        raise CorpusError(f"{path}: empty file (no rows)")
    return pf


_DATASETS: dict[str, object] = {}  # per process: a dataset is opened (memory-mapped) once


def _dataset(path: str):
    if path not in _DATASETS:
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as err:
            raise CorpusError(f"{path}: not a dataset written by save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise CorpusError(f"{path}: a DatasetDict (splits {', '.join(ds)}); point "
                              f"data.corpus.path at one of them, e.g. {Path(path) / next(iter(ds))}")
        _DATASETS[path] = ds
    return _DATASETS[path]


def plan(corpus, spec: _Spec) -> tuple[list[Unit], dict]:
    """The units of a corpus, and what is known of it before reading it; the checks that need no
    full read (a missing path, a glob matching nothing, an empty file, a missing field) fail here."""
    if corpus.format == "shakespeare":
        names = list_plays()
        paths = [str(plays_dir() / f"{n}{PLAYS_SUFFIX}") for n in names]
        size = sum(os.path.getsize(p) for p in paths)
        unit = Unit(0, "shakespeare", tuple(paths), tuple(names), size, docs=len(names))
        return [unit], {"files": len(paths), "bytes": size}
    root, files = _files(corpus)
    units: list[Unit] = []

    def add(**kw) -> None:
        units.append(Unit(index=len(units), format=corpus.format, **kw))

    if corpus.format == "hf_dataset":
        ds = _dataset(str(root))
        for field in filter(None, (spec.text_field, spec.name_field)):
            if field not in ds.column_names:
                raise CorpusError(f"{root}: no column {field!r} (its columns: {', '.join(ds.column_names)}); "
                                  f"set data.corpus.{'text' if field == spec.text_field else 'name'}_field")
        if len(ds) == 0:
            raise CorpusError(f"{root}: empty dataset (no rows)")
        size = max(1, ds.data.nbytes)
        step = max(1, len(ds) * UNIT_BYTES // size)
        for a in range(0, len(ds), step):
            b = min(a + step, len(ds))
            add(paths=(str(root),), names=(root.name,), nbytes=size * (b - a) // len(ds), start=a, stop=b,
                first_row=a, docs=b - a)
        return units, {"files": 1, "bytes": size}
    sizes = {}
    for f in files:
        sizes[f] = f.stat().st_size
        if sizes[f] == 0:
            raise CorpusError(f"{f}: empty file")
    rel = {f: f.relative_to(root).as_posix() for f in files}
    if corpus.format == "txt":  # files grouped into units of about UNIT_BYTES
        group, group_bytes = [], 0
        for f in files + [None]:
            if group and (f is None or group_bytes + sizes[f] > UNIT_BYTES):
                add(paths=tuple(map(str, group)), names=tuple(rel[g] for g in group), nbytes=group_bytes,
                    docs=len(group))
                group, group_bytes = [], 0
            if f is not None:
                group.append(f)
                group_bytes += sizes[f]
    elif corpus.format == "jsonl":
        for f in files:
            _first_record(f, spec)
            for a, b in ([(0, None)] if f.name.endswith(".gz") else _line_ranges(f, sizes[f])):
                add(paths=(str(f),), names=(rel[f],), nbytes=(b if b is not None else sizes[f]) - a,
                    start=a, stop=b)
    elif corpus.format == "parquet":
        for f in files:
            meta = _parquet_schema(f, spec).metadata
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                add(paths=(str(f),), names=(rel[f],), nbytes=sizes[f] * n // meta.num_rows, start=g,
                    first_row=row, docs=n)
                row += n
    return units, {"files": len(files), "bytes": sum(sizes.values())}


def _line_ranges(path: Path, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about UNIT_BYTES, each ending just after a newline."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + UNIT_BYTES < size:
            f.seek(cuts[-1] + UNIT_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [size]))


# --------------------------------------------------------------------------- reading documents
_advance: Callable[[int], None] = lambda n: None  # noqa: E731 -- input bytes read, for the progress bar


def _init_worker(counter) -> None:
    global _advance

    def advance(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _advance = advance


def _record(line: bytes, where: str, spec: _Spec) -> tuple[str, Optional[str]]:
    """(text, name) of one JSON line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorpusError(f"{where}: not UTF-8 (undecodable byte at column {err.start + 1})") from None
    except json.JSONDecodeError as err:
        raise CorpusError(f"{where}: not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object with a {spec.text_field!r} field")
    for field in filter(None, (spec.text_field, spec.name_field)):
        if field not in record:
            raise CorpusError(f"{where}: no field {field!r} (its fields: {', '.join(record)}); set "
                              f"data.corpus.{'text' if field == spec.text_field else 'name'}_field")
    text = record[spec.text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {spec.text_field!r} holds a {type(text).__name__}, not text")
    return text, (str(record[spec.name_field]) if spec.name_field else None)


def _txt_pieces(path: str) -> Iterator[str]:
    """A text file's text, a chunk at a time, each ending at a line end where there is one."""
    decoder, carry, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise CorpusError(f"{path}: not UTF-8 (undecodable byte at offset "
                                  f"{offset - pending + err.start})") from None
            offset += len(block)
            _advance(len(block))
            if not block:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1 or len(text)  # whole lines to the tokenizer
            carry = text[cut:]
            yield text[:cut]


def _texts(unit: Unit, spec: _Spec) -> Iterator[tuple[str, str, str]]:
    """(text, name, where) of each document of a jsonl / parquet / dataset unit: one per line or row.
    A document's default name is `<file>:<line>` (jsonl, lines from 1), `<file>:<row>` (parquet,
    rows from 0) or `<row>` (a dataset)."""
    path, rel = unit.paths[0], unit.names[0]
    if unit.format == "jsonl":
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            f.seek(unit.start)
            pos, line_no, unreported = unit.start, unit.first_row or 1, 0
            for line in f:
                if unit.stop is not None and pos >= unit.stop:
                    break
                pos, unreported = pos + len(line), unreported + len(line)
                if unreported >= 1 << 20:
                    _advance(unreported)
                    unreported = 0
                if line.strip():
                    where = f"{path}:{line_no}"
                    text, name = _record(line, where, spec)
                    yield text, name if spec.name_field else f"{rel}:{line_no}", where
                line_no += 1
            _advance(unreported)
        return
    fields = [c for c in (spec.text_field, spec.name_field) if c]
    if unit.format == "parquet":
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, row_groups=[unit.start],
                                                   columns=fields)
    else:
        table = _dataset(path).with_format("arrow")
        batches = (table[a : min(a + BATCH_ROWS, unit.stop)] for a in range(unit.start, unit.stop, BATCH_ROWS))
    row = unit.first_row
    for batch in batches:
        columns = {c: batch.column(c) for c in fields}
        for i in range(batch.num_rows):
            where = f"{path}: row {row}"
            try:
                text = columns[spec.text_field][i].as_py()
                if isinstance(text, bytes):
                    text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(f"{where}: not UTF-8 (undecodable byte at offset {err.start})") from None
            if text is None:
                raise CorpusError(f"{where}: column {spec.text_field!r} is null")
            if spec.name_field:
                name = str(columns[spec.name_field][i].as_py())
            else:
                name = f"{rel}:{row}" if unit.format == "parquet" else str(row)
            yield text, name, where
            row += 1
        _advance(unit.nbytes * batch.num_rows // max(1, unit.docs))


def _documents(unit: Unit, spec: _Spec) -> Iterator[tuple[int, str, str, Iterator[str]]]:
    """(corpus index, name, where, text pieces) of each document of a unit, in corpus order."""
    index = unit.first_doc
    if unit.format in ("txt", "shakespeare"):
        for path, name in zip(unit.paths, unit.names):
            if unit.format == "txt":
                pieces = _txt_pieces(path)
            else:
                pieces = iter((read_play(name).decode("utf-8"),))
                _advance(os.path.getsize(path))
            yield index, name, path, pieces
            index += 1
    else:
        for text, name, where in _texts(unit, spec):
            yield index, name, where, iter((text,))
            index += 1
    if index - unit.first_doc != unit.docs:
        raise CorpusError(f"{unit.paths[0]}: changed while prepare read it ({index - unit.first_doc} "
                          f"documents where {unit.docs} were counted); run prepare again")


def _count_unit(unit: Unit, spec: _Spec) -> tuple[int, int]:
    """(lines, non-blank lines) of a JSONL unit: its documents, and where the next unit's lines start."""
    lines = docs = 0
    path = unit.paths[0]
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        f.seek(unit.start)
        pos = unit.start
        for line in f:
            if unit.stop is not None and pos >= unit.stop:
                break
            pos += len(line)
            lines += 1
            docs += bool(line.strip())
    _advance(pos - unit.start)
    return lines, docs
