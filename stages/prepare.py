"""DVC stage `prepare`: Shakespeare splits + synthetic recall tasks under data/."""
from __future__ import annotations

from pathlib import Path

from stages import load_or_exit, parse_args


def main() -> None:
    args = parse_args(__doc__)
    params = load_or_exit(args.params)
    from pipeline.data import prepare

    manifest = prepare(params.data, Path("data"))
    print(f"[prepare] text bytes {manifest['bytes']}, MQAR sets {manifest['mqar_sets']}, "
          f"{manifest['retrieval_episodes']} retrieval episodes -> data/")


if __name__ == "__main__":
    main()
