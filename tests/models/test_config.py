"""Invalid configurations fail at construction, naming the field."""
import pytest
from pydantic import ValidationError

from models import ModelConfig


@pytest.mark.parametrize("fields, field_name", [
    (dict(d_model=30, n_heads=4), "n_heads"),
    (dict(attention={"kind": "gqa", "n_kv_heads": 3}), "n_kv_heads"),
    (dict(attention={"kind": "gqa"}), "n_kv_heads"),
    (dict(attention={"kind": "mqa", "n_kv_heads": 2}), "n_kv_heads"),
    (dict(attention={"kind": "swa", "window": 0}), "window"),
    (dict(attention={"kind": "tensor_cache", "chunk_size": 0}), "chunk_size"),
    (dict(attention={"kind": "tensor_cache", "write": "mean"}), "write"),
    (dict(attention={"kind": "tpa", "rank_k": 0}), "rank_k"),
    (dict(attention={"kind": "tensor_cache", "factors": {"rank_v": 0}}), "rank_v"),
    (dict(attention={"kind": "tensor_cache", "n_kv_heads": 2, "factors": {}}), "n_kv_heads"),
    (dict(attention={"kind": "tensor_cache", "factors": {"rank_k": 1, "rank": 2}}), "rank"),
    (dict(attention={"kind": "mla", "rope_dim": 5}), "rope_dim"),
    (dict(attention={"kind": "mla", "kv_lora_rank": -1}), "kv_lora_rank"),
    (dict(attention={"kind": "flash"}), "kind"),
    (dict(attention={"kind": "mha", "window": 4}), "window"),
    (dict(d_head=7), "d_head"),
])
def test_invalid_config_names_the_field(fields, field_name):
    with pytest.raises(ValidationError) as err:
        ModelConfig(**fields)
    assert field_name in str(err.value)


def test_defaults_resolve_and_round_trip():
    cfg = ModelConfig(d_model=64, n_heads=4, attention={"kind": "mqa"})
    assert (cfg.d_head, cfg.attention.n_kv_heads) == (16, 1)
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert ModelConfig(attention={"kind": "swa", "window": 8}).attention.n_kv_heads == 4
