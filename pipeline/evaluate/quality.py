"""Quality measures of one trained model: held-out bits per byte, and MQAR recall split by each
query's gap against the window, from the parallel forward and through the decode cache."""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch


def _device(model) -> torch.device:
    return model.embed.weight.device


@torch.no_grad()
def heldout_bits(model, text, context_len: int, n_windows: int, policy=None) -> tuple[np.ndarray, np.ndarray]:
    """Cross-entropy in bits of every predicted token, and the bytes of text it covers, both
    (n_windows, context_len), over evenly spaced windows of the held-out split (`text`: a
    `pipeline.core.tokens.TokenStream`; the same windows for every model of a study: the report's
    intervals resample them, paired). Column t is the token at distance t into its window.
    With a cache `policy`, every window is decoded token by token through it (all at once)."""
    if len(text) < context_len + 1:
        raise ValueError(f"eval.context_lengths: {context_len} tokens, but the held-out split holds {len(text):,}; "
                         "hold out more text (data.heldout_docs / heldout_plays) or evaluate shorter contexts")
    starts = np.linspace(0, len(text) - context_len - 1, n_windows).astype(np.int64)
    ids = torch.stack([torch.from_numpy(text.ids(s, s + context_len + 1)) for s in starts]).to(_device(model))
    nbytes = np.stack([text.nbytes(s + 1, s + context_len + 1) for s in starts])
    bits = lambda logits, i: (torch.nn.functional.cross_entropy(  # noqa: E731 -- one window's row
        logits.float(), ids[i, 1:], reduction="none") / math.log(2)).cpu().numpy()
    if policy is not None:
        logits = decode_logits(model, ids[:, :-1], policy)
        return np.stack([bits(logits[i], i) for i in range(len(starts))]), nbytes
    return np.stack([bits(model(ids[i : i + 1, :-1])[0], i) for i in range(len(starts))]), nbytes


def bits_by_distance(bits: np.ndarray, nbytes: np.ndarray, window: int) -> dict[str, float | None]:
    """Bits per byte split by the token's distance into its context: `t < W`, `t >= W`, `t >= 4W`
    (Tensor Cache's measure: what a model does once the window no longer holds the start)."""
    t = np.arange(bits.shape[1])
    parts = {"lt_W": t < window, "ge_W": t >= window, "ge_4W": t >= 4 * window}
    return {name: _part(bits, nbytes, mask) for name, mask in parts.items()}


def _part(bits: np.ndarray, nbytes: np.ndarray, mask: np.ndarray) -> float | None:
    """The bits per byte of the columns `mask` picks (None when it picks none)."""
    return float(bits[:, mask].sum() / max(1, nbytes[:, mask].sum())) if mask.any() else None


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor, policy=None) -> torch.Tensor:
    """Logits of `ids` computed one token at a time through the variant's own cache: what a
    deployed model computes (for chunk_mean this differs from its parallel training forward).
    Under a cache `policy`, one prefill through the policy's cache, which equals that token-by-token
    decode (`models.cache.PolicyCache`: each query sees the sinks and its own window)."""
    cache = model.init_cache(ids.shape[0], policy=policy)
    if policy is not None:
        return model(ids, cache=cache)
    return torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)


def _split(hit: np.ndarray, gap: np.ndarray, reach: tuple[int, int] | None) -> dict:
    """Accuracy over all queries, over those inside the shortest reach and beyond the longest."""
    out = {"acc": float(hit.mean()), "n": int(hit.size)}
    if reach is not None:
        inside, beyond = gap <= reach[0], gap > reach[1]
        out["acc_inside_window"] = float(hit[inside].mean()) if inside.any() else None
        out["acc_beyond_window"] = float(hit[beyond].mean()) if beyond.any() else None
        out["n_inside_window"], out["n_beyond_window"] = int(inside.sum()), int(beyond.sum())
    return out


@torch.no_grad()
def mqar_accuracy(model, mqar_cfg, num_pairs: int, gaps: tuple[int, int], n: int, seed: int,
                  reach: tuple[int, int] | None, decode: bool = True, policy=None) -> dict:
    """Accuracy on `n` fresh MQAR sequences, also split by each query's gap against the study's
    reach (`_split`); "hits" and "gaps" keep every query (0/1, gap) for the report's intervals.
    With `decode`, the same queries are also scored through the decode cache ("decode": {...}).
    With a cache `policy`, they are scored through the decode path only (it is the model)."""
    from pipeline.core.data import make_mqar

    cfg = mqar_cfg.model_copy(update={"num_pairs": num_pairs})
    data = make_mqar(cfg, n, tuple(gaps), seed)
    tokens = torch.from_numpy(data["tokens"].astype(np.int64)).to(_device(model))
    mask = torch.from_numpy(data["answer_mask"][:, 1:]).to(tokens.device)
    gap = data["gaps"][data["gaps"] >= 0]  # row by row, in query order: the answers' order
    hits = lambda logits: (logits.argmax(-1) == tokens[:, 1:])[mask].cpu().numpy()  # noqa: E731 -- row order
    hit = hits(model(tokens[:, :-1]) if policy is None else decode_logits(model, tokens[:, :-1], policy))
    out = {**_split(hit, gap, reach), "hits": hit.astype(int).tolist(), "gaps": gap.astype(int).tolist()}
    if decode and policy is None:
        out["decode"] = _split(hits(decode_logits(model, tokens[:, :-1])), gap, reach)
    return out


@contextmanager
def l2_off(model):
    """A Tensor Cache with its L2 switched off: every head's gate at -inf, sigmoid(gate) = 0, so
    o = o1, the window alone (docs/design.md#does-l2-carry-anything). The gates come back after."""
    gates = [block.attn.gate for block in model.blocks]
    kept = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.fill_(-math.inf)
        yield model
    finally:
        with torch.no_grad():
            for g, k in zip(gates, kept):
                g.copy_(k)


def measure_l2_off(model, text, job) -> dict:
    """bits per byte and MQAR of a Tensor Cache with L2 switched off (`l2_off`): what the report
    takes from the same measures with L2 on to say how much comes through L2."""
    with l2_off(model):
        out = measure(model, text, job, capacity=False, decode=False)
    return {k: out[k] for k in ("bpb", "bpb_windows", "mqar")}


def measure(model, text: np.ndarray, job, policy=None, capacity: bool = True, decode: bool = True) -> dict:
    """The quality fields of one evaluation result (`job`: a `pipeline.core.jobs.EvalJob`; `text`: the
    held-out `TokenStream`): bits per byte per context length (in tokens; a length's bpb is the mean
    of its windows' bits per byte), by distance into the trained length (`job.trained_len`, else
    the longest) and, past the trained length, at the longest context (extrapolation, its own
    number); MQAR per pair count and gap bucket (also through the decode cache, with `decode`);
    the capacity curve (with `capacity`; every beyond-window hit kept, for the report's capacity
    intervals); through the cache `policy` when one is given."""
    cfg, mqar_cfg = job.eval, job.mqar
    out = {"bpb": {}, "bpb_windows": {}, "mqar": {}}
    longest, trained = max(cfg.context_lengths), job.trained_len or max(cfg.context_lengths)
    for length in cfg.context_lengths:
        bits, nbytes = heldout_bits(model, text, length, max(1, cfg.bpb_tokens // length), policy)
        windows = (bits.sum(axis=1) / np.maximum(1, nbytes.sum(axis=1))).tolist()  # each window's bits per byte
        out["bpb"][str(length)], out["bpb_windows"][str(length)] = float(np.mean(windows)), windows
        if length == trained and job.reach is not None:
            out["bpb_by_distance"] = {"context": length, "window": job.min_window,
                                      **bits_by_distance(bits, nbytes, job.min_window)}
        if length == longest and job.reach is not None and longest > trained:
            past = {"past_trained": _part(bits, nbytes, np.arange(length) >= trained), "longest": length}
    if "bpb_by_distance" in out and longest > trained:
        out["bpb_by_distance"].update(past)  # extrapolation: tokens past the trained length, at the longest
    for pairs in cfg.mqar_pairs:
        for bucket, gaps in mqar_cfg.eval_gaps.items():
            out["mqar"][f"p{pairs}_{bucket}"] = {
                "num_pairs": pairs, "bucket": bucket, "gaps": list(gaps),
                **mqar_accuracy(model, mqar_cfg, pairs, gaps, cfg.mqar_examples, cfg.seed, job.reach,
                                decode=decode, policy=policy)}
    far = mqar_cfg.eval_gaps[mqar_cfg.farthest_bucket]
    for pairs in cfg.capacity_pairs if capacity else []:  # recall beyond every window as the stored pairs grow
        r = mqar_accuracy(model, mqar_cfg, pairs, far, cfg.mqar_examples, cfg.seed + 1, job.reach,
                          decode=False, policy=policy)
        beyond = [h for h, g in zip(r["hits"], r["gaps"]) if job.reach is not None and g > job.reach[1]]
        out.setdefault("capacity", {})[str(pairs)] = {"gaps": list(far), "hits_beyond_window": beyond, **{
            k: r[k] for k in ("acc", "acc_beyond_window", "n_beyond_window") if k in r}}
    return out
