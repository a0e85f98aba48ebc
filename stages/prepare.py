"""DVC stage `prepare`: the corpus split by whole documents + synthetic recall tasks under data/."""
from __future__ import annotations

import sys
from pathlib import Path

from stages import load_or_exit, parse_args


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params, tracked=False)  # prepare logs nothing to MLflow
    from pipeline.prepare.corpus import CorpusError
    from pipeline.prepare.prepare import prepare

    try:
        manifest = prepare(params.data, Path("data"))
    except CorpusError as err:  # an unreadable corpus: one line naming the file, nothing written
        print(f"{Path(args.params).name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    corpus, seconds = manifest["corpus"], manifest["corpus_seconds"]
    print(f"[prepare] corpus {corpus['format']}: {corpus['files']} files, "
          f"{sum(manifest['documents'].values())} documents, {corpus['bytes'] / 1e6:.1f} MB in {seconds:.1f} s "
          f"({corpus['bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)")
    tok = manifest["tokenizer"]
    if tok["name"] != "bytes":
        print(f"[prepare] tokenizer {tok['name']} ({tok['vocab_size']} ids, saved in data/tokenizer): tokens "
              + ", ".join(f"{split} {n:,} ({manifest['bytes'][split] / max(n, 1):.2f} bytes each)"
                          for split, n in tok["tokens"].items()) + " -> data/tokens")
    print(f"[prepare] text bytes {manifest['bytes']}, MQAR sets {manifest['mqar_sets']}, "
          f"{manifest['retrieval_episodes']} retrieval episodes -> data/")


if __name__ == "__main__":
    main()
