import hashlib

import pytest
import torch

from models import ModelConfig, build_model
from pipeline.core import checkpoint
from pipeline.core.params import TrainConfig
from pipeline.train.loop import make_optimizer


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(d_model=16, n_layers=1, n_heads=2, tie_embeddings=True))
    return model, make_optimizer(model, TrainConfig(steps=10, warmup_steps=1))


def _step(model, optimizer):
    loss = model(torch.randint(3, 259, (2, 8))).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_roundtrip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer(0)
    for _ in range(3):
        _step(model, opt)
    checkpoint.save(tmp_path, 3, model, opt, {"fingerprint": "abc", "history": [{"step": 3}]})
    expected_rand = torch.rand(4)
    torch.manual_seed(123)
    _step(model, opt)  # the uninterrupted run's next step
    after_one_more = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = _model_and_optimizer(1)  # different init: everything must come from the file
    meta = checkpoint.restore(tmp_path, model2, opt2)
    assert meta["step"] == 3 and meta["fingerprint"] == "abc"
    assert torch.equal(torch.rand(4), expected_rand)  # RNG state restored
    torch.manual_seed(123)
    _step(model2, opt2)  # the resumed run's next step: equal bit for bit only if the
    # weights AND the AdamW moments and step counts came back
    assert set(after_one_more) == set(model2.state_dict())
    for k, v in model2.state_dict().items():
        assert torch.equal(v, after_one_more[k]), k


def test_only_latest_step_kept_and_pointer_is_the_commit(tmp_path):
    model, opt = _model_and_optimizer(0)
    checkpoint.save(tmp_path, 1, model, opt, {"history": []})
    checkpoint.save(tmp_path, 2, model, opt, {"history": []})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest.json", "step-000002.json", "step-000002.safetensors"]
    # a half-written newer step (killed before the pointer moved) is ignored
    (tmp_path / "step-000003.safetensors").write_bytes(b"garbage")
    assert checkpoint.load_latest(tmp_path)["step"] == 2
    assert checkpoint.load_final_meta(tmp_path) is None
    checkpoint.save_final(tmp_path, model, {"fingerprint": "f"})
    assert checkpoint.load_final_meta(tmp_path) == {
        "fingerprint": "f", "complete": True,
        "weights_sha256": hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_checkpoint_is_named_never_loaded(tmp_path, damage):
    model, opt = _model_and_optimizer(0)
    _step(model, opt)
    checkpoint.save(tmp_path, 1, model, opt, {"history": []})
    checkpoint.save_final(tmp_path, model, {"fingerprint": "f"})
    for name in ("step-000001.safetensors", "model.safetensors"):
        path = tmp_path / name
        data = path.read_bytes()
        if damage == "flip":  # same size, a few random bytes changed
            at = torch.randint(0, len(data) - 8, (1,)).item()
            path.write_bytes(data[:at] + bytes(8 * [data[at] ^ 0xFF]) + data[at + 8:])
        elif damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.unlink()
    with pytest.raises(checkpoint.CorruptCheckpoint, match="model.safetensors"):
        checkpoint.load_final_meta(tmp_path)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="model.safetensors"):
        checkpoint.load_model(tmp_path)
    model2, opt2 = _model_and_optimizer(1)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(checkpoint.CorruptCheckpoint, match="step-000001.safetensors"):
        checkpoint.restore(tmp_path, model2, opt2)
    assert all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())  # nothing loaded
    checkpoint.discard_steps(tmp_path)
    assert checkpoint.load_latest(tmp_path) is None
