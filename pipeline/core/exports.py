"""An export folder's card and digests: written by the export stage, checked by the evaluate stage
before lm-eval reads any of it."""
from __future__ import annotations

from pathlib import Path

from pipeline.core import checkpoint

EXPORT_META = "kvf_export.json"


class CorruptExport(RuntimeError):
    """An export file that is missing or not the bytes the export stage wrote (the message names it)."""


def export_digests(out_dir: Path) -> dict[str, str]:
    """sha256 of every file of an export but its card (which records them)."""
    return {p.relative_to(out_dir).as_posix(): checkpoint.file_sha256(p)
            for p in sorted(Path(out_dir).rglob("*")) if p.is_file() and p.name != EXPORT_META}


def verify_export(out_dir: Path) -> dict:
    """The export's card, after checking every file against the digests it recorded."""
    out_dir = Path(out_dir)
    card_path = out_dir / EXPORT_META
    if not card_path.exists():
        raise CorruptExport(f"{card_path}: missing")
    card = checkpoint.read_json(card_path)
    for rel, sha in card.get("files", {}).items():
        path = out_dir / rel
        if not path.is_file():
            raise CorruptExport(f"{path}: missing")
        if checkpoint.file_sha256(path) != sha:
            raise CorruptExport(f"{path}: not the bytes the export stage wrote (sha256 differs)")
    return card

