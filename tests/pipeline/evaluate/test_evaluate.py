"""Measured memory: a Tensor Cache holds a constant state while generating."""
from pipeline.evaluate.probe import probe_subprocess


def test_tensor_cache_memory_is_flat_while_generating(exports):
    root, _ = exports
    short = probe_subprocess(root / "ckpt" / "tensor_cache", 256, 0, "generate", 1)
    long = probe_subprocess(root / "ckpt" / "tensor_cache", 2048, 0, "generate", 1)
    assert short["cache_bytes"] == long["cache_bytes"] == short["cache_bytes_analytic"]
    assert long["tokens_held"] == 2048 + 8
    assert long["peak_rss_bytes"] <= 1.05 * short["peak_rss_bytes"]


def test_full_cache_grows_with_the_context(exports):
    root, _ = exports
    p = probe_subprocess(root / "ckpt" / "gqa", 1024, 4, "prefill", 1)
    # gqa: 2 layers x (k, v) x 2 kv heads x d_h 8 x fp32 per token
    assert p["cache_bytes"] == (1024 + 4) * 2 * 2 * 2 * 8 * 4
