"""Checkpoints: safetensors (weights, optimizer moments, RNG state) + JSON metadata, written atomically.

Layout of one variant's folder:
    step-000200.safetensors  step-000200.json   the resumable state at step 200
    latest.json                                 {"step": 200} -- the commit point
    model.safetensors  model.json               the final weights + metadata, once complete
Every file is written to a temp name and `os.replace`d; `latest.json` moves only after the
step's pair is complete, so a `kill -9` at any moment leaves a loadable checkpoint.
Each JSON records the sha256 of its safetensors file (`weights_sha256`), checked whenever the
weights are read: a file changed or cut on disk raises `CorruptCheckpoint`, naming it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest.json"
FINAL_WEIGHTS = "model.safetensors"
FINAL_META = "model.json"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file whose bytes are not the ones written (the message names it)."""


class DiskFull(OSError):
    """A write that found no space left on its device: the message names the file, the bytes it
    needed and those free. Nothing half-written is left (the temp file is removed)."""


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize
    except OSError:
        return -1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str | None) -> None:
    """Raise CorruptCheckpoint unless `path` exists and hashes to `expected` (None: not recorded,
    as in checkpoints written before digests existed)."""
    if not Path(path).exists():
        raise CorruptCheckpoint(f"{path}: missing")
    if expected is not None and file_sha256(path) != expected:
        raise CorruptCheckpoint(f"{path}: its bytes do not match the sha256 recorded when it was "
                                f"written (changed or cut on disk)")


def _atomic_write(path: Path, write, needs: int, then: str = "") -> None:
    """`write(tmp)` a temp file beside `path`, fsync it, move it to `path`; on any failure the temp
    file is removed and `path` is as it was. No space left: DiskFull (`needs`: the bytes the
    file takes, about; `then`: what a rerun does, RESUMES by default)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise_if_full(err, path, needs, then or RESUMES)
        raise
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception):
            raise_if_full(err, path, needs, then or RESUMES)
        raise


RESUMES = "make repro resumes from the last checkpoint"


def raise_if_full(err: Exception, path: Path, needs: int, then: str = RESUMES) -> None:
    """DiskFull when `err` says no space is left, or when the device has less room than the file
    needs (safetensors reports ENOSPC as a SafetensorError of its own); `then`: what a rerun does."""
    free = _free_bytes(Path(path).parent)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or 0 <= free < needs:
        raise DiskFull(f"{path}: no space left on its device (it needs about {needs:,} bytes; "
                       f"{free:,} free there): free some space, then run it again ({then})") from err


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_json(path: Path, obj: Any, then: str = "") -> None:
    """`obj` as JSON at `path`, atomically (`_atomic_write`; `then`: what a rerun does after a full disk)."""
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text), len(text.encode()), then)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state -> (flat tensors for safetensors, JSON-safe rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(ckpt_dir: Path, step: int, model, optimizer, meta: dict) -> None:
    """Write the resumable state at `step`, move `latest.json` to it, drop older steps."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    stem = f"step-{step:06d}"
    _atomic_write(ckpt_dir / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp), _nbytes(tensors))
    write_json(ckpt_dir / f"{stem}.json", {**meta, "step": step, "optimizer": optim_meta,
                                           "weights_sha256": file_sha256(ckpt_dir / f"{stem}.safetensors")})
    write_json(ckpt_dir / LATEST, {"step": step, "stem": stem})
    for old in ckpt_dir.glob("step-*"):
        if not old.name.startswith(stem):
            old.unlink(missing_ok=True)


def load_latest(ckpt_dir: Path) -> dict | None:
    """The metadata of the last committed step (None if there is none)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / LATEST).exists():
        return None
    latest = read_json(ckpt_dir / LATEST)
    return read_json(ckpt_dir / f"{latest['stem']}.json")


def restore(ckpt_dir: Path, model, optimizer) -> dict:
    """Load weights, optimizer and RNG state of the last committed step; returns its metadata.
    Raises CorruptCheckpoint when the step's file is not the one written."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_json(ckpt_dir / LATEST)
    meta = read_json(ckpt_dir / f"{latest['stem']}.json")
    weights = ckpt_dir / f"{latest['stem']}.safetensors"
    verify(weights, meta.get("weights_sha256"))
    tensors = load_file(weights)
    device = next(model.parameters()).device
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optim = {k: v.to(device) if not k.endswith(".step") else v for k, v in tensors.items()
             if k.startswith("optim.")}
    _restore_optimizer(optimizer, optim, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return meta


def save_final(ckpt_dir: Path, model, meta: dict) -> None:
    """The finished model: weights alone (what export reads) + metadata with `complete: true`."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # clone: tied weights share storage
    _atomic_write(ckpt_dir / FINAL_WEIGHTS, lambda tmp: save_file(weights, tmp), _nbytes(weights))
    write_json(ckpt_dir / FINAL_META, {**meta, "complete": True,
                                       "weights_sha256": file_sha256(ckpt_dir / FINAL_WEIGHTS)})


def discard_steps(ckpt_dir: Path) -> None:
    """Forget the resumable state (a corrupt step): the run starts again from step 0."""
    for path in [Path(ckpt_dir) / LATEST, *Path(ckpt_dir).glob("step-*")]:
        path.unlink(missing_ok=True)


def load_final_meta(ckpt_dir: Path, check: bool = True) -> dict | None:
    """The finished model's metadata, None when the run has not finished; with `check`, raises
    CorruptCheckpoint when its weights are not the bytes written."""
    path = Path(ckpt_dir) / FINAL_META
    if not path.exists():
        return None
    meta = read_json(path)
    if not meta.get("complete"):
        return None
    if check:
        verify(Path(ckpt_dir) / FINAL_WEIGHTS, meta.get("weights_sha256"))
    return meta


def load_model(ckpt_dir: Path):
    """(models.LanguageModel in eval mode, final metadata) from a completed checkpoint folder."""
    from models import ModelConfig, build_model

    meta = load_final_meta(ckpt_dir)
    if meta is None:
        raise FileNotFoundError(f"{ckpt_dir}: no completed checkpoint ({FINAL_META} with complete: true)")
    model = build_model(ModelConfig.model_validate(meta["model_config"]))
    model.load_state_dict(load_file(Path(ckpt_dir) / FINAL_WEIGHTS))
    return model.eval(), meta
