"""The training loss a chunk of positions at a time (`train.loss_chunk`) against the plain one."""
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from pipeline.train.loop import chunked_cross_entropy


def test_chunked_cross_entropy_equals_the_whole_logits_loss_and_its_gradients():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, init_std=0.1, attention={"kind": "gqa",
                                                                                                 "n_kv_heads": 2})
    model = build_model(cfg).double()
    x = torch.randint(0, 97, (2, 23), generator=g)
    y = torch.randint(0, 97, (2, 23), generator=g)
    y[0, :5] = -100  # positions without a target count in neither
    whole = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    want = torch.autograd.grad(whole, list(model.parameters()))
    for chunk in (5, 23, 64):  # uneven, exact, larger than the sequence
        loss = chunked_cross_entropy(model, x, y, chunk)
        got = torch.autograd.grad(loss, list(model.parameters()))
        assert abs(float((loss - whole).detach())) < 1e-12 * float(whole.detach())
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(got, want))
