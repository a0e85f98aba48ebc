"""Quality measures of one trained model: held-out bits per byte, and MQAR recall split by each
query's gap against the window, from the parallel forward and through the decode cache."""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline import tokenizer


def _device(model) -> torch.device:
    return model.embed.weight.device


@torch.no_grad()
def heldout_bpb(model, text: np.ndarray, context_len: int, n_windows: int) -> float:
    """Mean cross-entropy in bits per byte over `n_windows` evenly spaced held-out windows."""
    starts = np.linspace(0, len(text) - context_len - 1, n_windows).astype(np.int64)
    nats = 0.0
    for s in starts:
        ids = torch.from_numpy(tokenizer.bytes_to_ids(np.asarray(text[s : s + context_len + 1])))[None]
        ids = ids.to(_device(model))
        logits = model(ids[:, :-1])
        nats += torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:]).item()
    return nats / n_windows / math.log(2)


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `ids` computed one token at a time through the variant's own cache: what a
    deployed model computes (for chunk_mean this differs from its parallel training forward)."""
    cache = model.init_cache(ids.shape[0])
    return torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)


def _split(hit: np.ndarray, gap: np.ndarray, window: int | None) -> dict:
    out = {"acc": float(hit.mean()), "n": int(hit.size)}
    if window is not None:
        inside = gap <= window
        out["acc_inside_window"] = float(hit[inside].mean()) if inside.any() else None
        out["acc_beyond_window"] = float(hit[~inside].mean()) if (~inside).any() else None
    return out


@torch.no_grad()
def mqar_accuracy(model, mqar_cfg, num_pairs: int, gaps: tuple[int, int], n: int, seed: int,
                  window: int | None, decode: bool = True) -> dict:
    """Accuracy on `n` fresh MQAR sequences; per query also split by gap <= window / beyond.
    With `decode`, the same queries are also scored through the decode cache ("decode": {...})."""
    from pipeline.data import make_mqar

    cfg = mqar_cfg.model_copy(update={"num_pairs": num_pairs})
    data = make_mqar(cfg, n, tuple(gaps), seed)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64)).to(_device(model))
    mask = torch.from_numpy(data["answer_mask"][:, 1:]).to(tokens.device)
    gap = data["gaps"].reshape(-1)
    hits = lambda logits: (logits.argmax(-1) == tokens[:, 1:])[mask].cpu().numpy()  # noqa: E731 -- row order
    out = _split(hits(model(tokens[:, :-1])), gap, window)
    if decode:
        out["decode"] = _split(hits(decode_logits(model, tokens[:, :-1])), gap, window)
    return out
