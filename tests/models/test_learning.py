"""Every variant learns: on a tiny associative-recall task the answer loss falls clearly.

Sequences are 4 key-value pairs followed by the same pairs in a new order; the loss is taken on
the values of the second half, which can only be predicted by recalling the first half. The loss
starts near ln(vocab) = 3.6 nats; guessing among the 16 values without recall gives
ln 16 = 2.77. Each variant must fall by more than 1.5 nats and clearly below that no-recall floor
(measured after 500 steps: 1.26 for MHA up to 1.99 for TPA).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model

from ..variants import config

N_PAIRS, N_KEYS, N_VALUES = 4, 16, 16
LEARNERS = {
    "mha": {"kind": "mha"},
    "gqa": {"kind": "gqa", "n_kv_heads": 2},
    "mqa": {"kind": "mqa"},
    "mla": {"kind": "mla", "kv_lora_rank": 16, "rope_dim": 8},
    "tpa": {"kind": "tpa", "rank_q": 4, "rank_k": 2, "rank_v": 2},
    "swa": {"kind": "swa", "window": 8},
    "linear": {"kind": "linear", "chunk_size": 8},
    "tensor_cache": {"kind": "tensor_cache", "window": 4, "chunk_size": 8},
    "tensor_cache_factored": {"kind": "tensor_cache", "window": 4, "chunk_size": 8,
                              "factors": {"rank_k": 2, "rank_v": 2}},
}


def recall_batch(batch: int, gen: torch.Generator):
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:N_PAIRS] for _ in range(batch)]) + 1
    values = torch.randint(0, N_VALUES, (batch, N_PAIRS), generator=gen) + 1 + N_KEYS
    order = torch.stack([torch.randperm(N_PAIRS, generator=gen) for _ in range(batch)])
    first = torch.stack([keys, values], -1).flatten(1)
    second = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
    ids = torch.cat([first, second], 1)  # (B, 4 * N_PAIRS)
    answer_pos = torch.arange(2 * N_PAIRS + 1, 4 * N_PAIRS, 2)  # values of the second half
    return ids, answer_pos


def answer_loss(model, ids, answer_pos):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits[:, answer_pos - 1].flatten(0, 1), ids[:, answer_pos].flatten())


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_variant_learns_recall(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(config("mha", d_model=32, n_heads=2, init_std=0.02, attention=LEARNERS[name]))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    eval_ids, eval_pos = recall_batch(256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = answer_loss(model, eval_ids, eval_pos).item()
    for _ in range(500):
        ids, pos = recall_batch(32, gen)
        loss = answer_loss(model, ids, pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = answer_loss(model, eval_ids, eval_pos).item()
    assert before > 3.0  # starts near ln(vocab)
    msg = f"{name}: answer loss {before:.2f} -> {after:.2f}"
    assert after < before - 1.5 and after < math.log(N_VALUES) - 0.5, msg
