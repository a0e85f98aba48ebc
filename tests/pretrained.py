"""A tiny "pretrained" Llama on disk (a Hugging Face folder with weights and a tokenizer), for the
tests of studies with a pretrained point: random weights drawn away from any default, and a
byte-level BPE trained on a play as its tokenizer (it holds every byte, as the recall tasks need)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_dir(path: Path, seed: int = 0, vocab: int = 320) -> Path:
    """Write the tiny Llama to `path` (created) and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.core import plays, tokenizer

    tok = tokenizer.train_bpe([plays.split_bytes(["hamlet"]).decode()[:100_000]], vocab_size=vocab)
    cfg = LlamaConfig(vocab_size=tokenizer.n_ids(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=48, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
