"""Memory and speed of one trained model, each measurement in a fresh process so that the peak
RSS belongs to that decode alone.

    python -m pipeline.evaluate.probe CKPT_DIR CONTEXT_LEN NEW_TOKENS prefill|generate THREADS

prints one JSON line: prefill `CONTEXT_LEN` tokens (chunks of 1024) then decode `NEW_TOKENS`
("prefill"), or decode `CONTEXT_LEN` tokens from an 8-token prompt ("generate": the flat-memory
check of bounded caches); cache.nbytes(), the analytic bytes, peak RSS, tokens/s.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.core import checkpoint, tokenizer

PREFILL_CHUNK = 1024
PROMPT_TOKENS = 8  # the "generate" mode's prompt
RSS_EVERY = 64  # decode steps between RSS samples


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(ckpt_dir: str, context_len: int, new_tokens: int, mode: str, threads: int = 1) -> dict:
    """Measure in this process (call it through `probe_subprocess`)."""
    torch.set_num_threads(threads)
    model, _ = checkpoint.load_model(Path(ckpt_dir))
    rng = torch.Generator().manual_seed(0)
    base_rss = peak = _rss_bytes()  # after imports and weights: what decoding adds is measured
    cache = model.init_cache(1)
    with torch.no_grad():
        prompt_len = context_len if mode == "prefill" else PROMPT_TOKENS
        prompt = torch.randint(tokenizer.BYTE_OFFSET, tokenizer.VOCAB_SIZE, (1, prompt_len), generator=rng)
        t0 = time.perf_counter()
        for i in range(0, prompt_len, PREFILL_CHUNK):
            logits = model(prompt[:, i : i + PREFILL_CHUNK], cache=cache)
            peak = max(peak, _rss_bytes())
        t1 = time.perf_counter()
        steps = new_tokens if mode == "prefill" else context_len
        nxt = logits[:, -1:].argmax(-1)
        for step in range(steps):
            nxt = model(nxt, cache=cache)[:, -1:].argmax(-1)
            if step % RSS_EVERY == 0:
                peak = max(peak, _rss_bytes())
        t2 = time.perf_counter()
    return {"mode": mode, "context_len": context_len, "tokens_held": cache.seq_len,
            "cache_bytes": cache.nbytes(), "cache_bytes_analytic": model.cache_nbytes(cache.seq_len),
            "peak_rss_bytes": max(peak, _rss_bytes()),  # sampled while decoding
            "rss_before_bytes": base_rss,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "prefill_tokens_per_s": prompt_len / max(t1 - t0, 1e-9),
            "decode_tokens_per_s": steps / max(t2 - t1, 1e-9)}


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL when the worker that started it dies, so a
    killed evaluate leaves no probe measuring on its own."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def probe_subprocess(ckpt_dir: Path, context_len: int, new_tokens: int, mode: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", __name__, str(ckpt_dir), str(context_len),
           str(new_tokens), mode, str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ckpt, length, new, mode, threads = sys.argv[1:6]
    print(json.dumps(probe(ckpt, int(length), int(new), mode, int(threads))))
