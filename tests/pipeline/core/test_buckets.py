"""MQAR buckets by what a model can reach: one hop (< W_min), reach (<= n_layers (W_min - 1)),
beyond (> n_layers (W_max - 1)); gaps between the two reaches in none."""
import numpy as np

from pipeline.core.results import row


def test_queries_fall_in_the_bucket_their_gap_names():
    rng = np.random.default_rng()
    gaps = rng.integers(1, 80, size=400)
    hits = rng.integers(0, 2, size=400)
    n_layers, w_min, w_max = 2, 6, 16
    reach = [n_layers * (w_min - 1), n_layers * (w_max - 1)]  # 10, 30
    result = {"variant": "swa.window6", "kind": "swa", "params": 1, "cache_bytes_per_token_analytic": 1.0,
              "reach": reach, "bpb_by_distance": {"window": w_min},
              "mqar": {"a": {"hits": hits[:250].tolist(), "gaps": gaps[:250].tolist()},
                       "b": {"hits": hits[250:].tolist(), "gaps": gaps[250:].tolist()}}}
    r = row(result, 1024, 128)
    one_hop, within, beyond = gaps <= w_min - 1, (gaps >= w_min) & (gaps <= reach[0]), gaps > reach[1]
    assert r["_examples"]["mqar_one_hop"] == hits[one_hop].astype(float).tolist()
    assert r["_examples"]["mqar_reach"] == hits[within].astype(float).tolist()
    assert r["_examples"]["mqar_beyond"] == hits[beyond].astype(float).tolist()
    assert r["mqar_one_hop"] == hits[one_hop].mean() and r["mqar_reach"] == hits[within].mean()
    assert r["mqar_beyond"] == hits[beyond].mean()
    # gaps 11..30: past every model's reach for some windows and not others: no bucket
    counted = sum(len(r["_examples"][k]) for k in ("mqar_one_hop", "mqar_reach", "mqar_beyond"))
    assert counted == 400 - int(((gaps > reach[0]) & (gaps <= reach[1])).sum())
