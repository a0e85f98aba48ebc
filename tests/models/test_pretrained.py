"""Importing a Llama checkpoint (models/pretrained.py), against transformers' own LlamaForCausalLM:
random tiny Llamas (every weight drawn, norms included, so a swapped name cannot hide) saved as
Hugging Face directories and as GGUF files, compared on fresh random token ids in float32."""
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.pretrained import load_pretrained, model_config, save_pretrained_dir

from ..helpers import rel_err
from .test_decode import decode_all

VOCAB, T = 101, 19
SHAPES = {  # name: (KV heads, head_dim, tied head)
    "gqa-untied": (2, 16, False),
    "mha-tied-head24": (4, 24, True),
    "mqa-untied": (1, 16, False),
}


def tiny_llama(name: str, seed: int = 0) -> LlamaForCausalLM:
    kv_heads, head_dim, tied = SHAPES[name]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=96,
                      rope_theta=5e5, rms_norm_eps=3e-5, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.15 * torch.randn_like(p))
    return model


def assert_same_logits(ours, reference, seed: int = 1) -> None:
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        got = ours(ids)
    assert want.std() > 0.5  # informative logits
    assert rel_err(got, want) <= 1e-4, rel_err(got, want)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_hf_directory_imports_to_the_same_logits(name, tmp_path):
    reference = tiny_llama(name)
    reference.save_pretrained(tmp_path)  # safetensors
    ours, tokenizer = load_pretrained(tmp_path, tokenizer=False)
    kv_heads, head_dim, tied = SHAPES[name]
    cfg = ours.config
    assert tokenizer is None
    assert (cfg.attention.n_kv_heads, cfg.d_head, cfg.tie_embeddings) == (kv_heads, head_dim, tied)
    assert (cfg.rope_base, cfg.norm_eps, cfg.mlp_hidden) == (5e5, 3e-5, 96)
    assert cfg.attention.kind == {4: "mha", 2: "gqa", 1: "mqa"}[kv_heads]
    assert (ours.lm_head.weight is ours.embed.weight) == tied
    assert ours.num_parameters() == reference.num_parameters()
    assert_same_logits(ours, reference)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # decode through our cache equals our forward
        full = ours(ids)
        for prefill in (0, 7):
            logits, cache = decode_all(ours, ids, prefill)
            assert cache.seq_len == T and rel_err(logits, full) <= 1e-5


def test_sharded_directory(tmp_path):
    reference = tiny_llama("gqa-untied", seed=3)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_logits(load_pretrained(tmp_path, tokenizer=False)[0], reference)


def test_saved_directory_loads_back_equal_and_is_a_transformers_llama(tmp_path):
    reference = tiny_llama("mha-tied-head24", seed=4)
    reference.save_pretrained(tmp_path / "hf")
    ours, _ = load_pretrained(tmp_path / "hf", tokenizer=False)
    out = save_pretrained_dir(ours, None, tmp_path / "ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]  # no temporary left beside it
    back, _ = load_pretrained(out, tokenizer=False)
    assert back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert_same_logits(back, LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    with pytest.raises(FileExistsError):
        save_pretrained_dir(ours, None, out)


# --- GGUF: the test writes the file as llama.cpp's converter does (convert_hf_to_gguf.py) ---

def llama_cpp_permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's `permute` of q or k rows: rotate-half pairs (j, j + d/2) become (2j, 2j + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def write_gguf(model: LlamaForCausalLM, path, extra: dict | None = None, tokens: list[str] | None = None):
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    if tokens is not None:  # a tokenizer's arrays, as a real file has them before its tensors
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_scores(np.linspace(-1, 1, len(tokens)).astype(np.float32).tolist())
        writer.add_string("general.name", "tiny é")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    for name, w in model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        if "layers." in name:
            layer, part = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[part]}.weight"
        else:
            gname = GGUF_NAMES[name.removesuffix(".weight")] + ".weight"
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in gname else c.num_key_value_heads
            writer.add_tensor(gname, llama_cpp_permute(w, heads))
        else:
            writer.add_tensor(gname, w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["gqa-untied", "mha-tied-head24"])
def test_gguf_file_imports_to_the_same_logits(name, tmp_path):
    reference = tiny_llama(name, seed=5)
    write_gguf(reference, tmp_path / "tiny.gguf")
    ours, _ = load_pretrained(tmp_path / "tiny.gguf", tokenizer=False)
    want = model_config(reference.config.to_dict())
    assert ours.config.norm_eps == pytest.approx(want.norm_eps, rel=1e-7)  # GGUF stores a float32
    assert ours.config.model_copy(update={"norm_eps": want.norm_eps}) == want
    assert_same_logits(ours, reference)


def test_gguf_header_reads_what_the_gguf_package_reads(tmp_path):
    """The header reader (config without weights, arrays skipped) against gguf's own reader, on a
    file with a tokenizer's string and number arrays between the config and the tensors."""
    import gguf

    from models.pretrained import gguf_header, read_config

    rng = np.random.default_rng()
    tokens = ["".join(rng.choice(list("abcé▁<>"), size=rng.integers(1, 9))) for _ in range(int(rng.integers(50, 90)))]
    reference = tiny_llama("gqa-untied", seed=int(rng.integers(100)))
    write_gguf(reference, tmp_path / "tok.gguf", tokens=tokens)
    meta, shapes = gguf_header(tmp_path / "tok.gguf")
    reader = gguf.GGUFReader(tmp_path / "tok.gguf")
    arrays = {k for k, f in reader.fields.items() if f.types and f.types[0] == gguf.GGUFValueType.ARRAY}
    assert arrays == {"tokenizer.ggml.tokens", "tokenizer.ggml.scores"}
    assert all(meta[k] is None for k in arrays)  # skipped, not decoded
    assert {k: v for k, v in meta.items() if k not in arrays} == {  # GGUF.*: the reader's own header fields
        k: f.contents() for k, f in reader.fields.items() if k not in arrays and not k.startswith("GGUF.")}
    assert meta["general.name"] == "tiny é" and meta["tokenizer.ggml.model"] == "gpt2"
    assert shapes == {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    want = model_config(reference.config.to_dict())
    assert read_config(tmp_path / "tok.gguf").model_copy(update={"norm_eps": want.norm_eps}) == want


def test_gguf_fields_the_import_does_not_read_stop_it(tmp_path):
    write_gguf(tiny_llama("gqa-untied"), tmp_path / "moe.gguf", extra={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="^num_local_experts: 8 is not supported"):
        load_pretrained(tmp_path / "moe.gguf", tokenizer=False)
    write_gguf(tiny_llama("gqa-untied"), tmp_path / "odd.gguf", extra={"llama.some_new_field": 1})
    with pytest.raises(ValueError, match="^llama.some_new_field: a GGUF field the import does not read"):
        load_pretrained(tmp_path / "odd.gguf", tokenizer=False)


# --- what the import does not support stops it, naming the field ---

UNSUPPORTED = [
    ("model_type", "mistral"),
    ("architectures", ["MistralForCausalLM"]),
    ("hidden_act", "gelu"),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_parameters.rope_type", "linear"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("sliding_window", 4096),
    ("num_local_experts", 8),
    ("num_experts", 8),
    ("n_routed_experts", 64),
    ("num_experts_per_tok", 2),
]


@pytest.mark.parametrize("field, value", UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_fields_raise_naming_the_field(field, value, tmp_path):
    hf = tiny_llama("gqa-untied").config.to_dict()
    model_config(hf)  # the plain one is accepted
    if field == "rope_parameters.rope_type":
        hf["rope_parameters"] = dict(hf["rope_parameters"], rope_type=value, factor=2.0)
    else:
        hf[field] = value
    with pytest.raises(ValueError, match=f"^{field}: "):
        model_config(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))  # the loader stops before any weights
    with pytest.raises(ValueError, match=f"^{field}: "):
        load_pretrained(tmp_path, tokenizer=False)


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="^source: "):
        load_pretrained(tmp_path)
    tiny_llama("gqa-untied").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^tokenizer: "):
        load_pretrained(tmp_path)
