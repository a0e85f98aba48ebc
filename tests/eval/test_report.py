"""The report turns results into a PNG and a table."""
from pipeline.report import rows_from_results, write_report


def _result(variant, kind, per_token, far, seed=0, far_decode=None):
    far_decode = far if far_decode is None else far_decode
    return {"variant": variant, "kind": kind, "seed": seed, "params": 1000, "window": None,
            "run": variant if seed == 0 else f"{variant}.seed{seed}",
            "cache_bytes_per_token_analytic": per_token, "bpb": {"128": 3.0, "1024": 3.5},
            "mqar": {"p2_a": {"acc": far, "acc_beyond_window": far, "acc_inside_window": None,
                              "decode": {"acc": far_decode, "acc_beyond_window": far_decode}},
                     "p2_b": {"acc": 0.9, "acc_beyond_window": None, "acc_inside_window": 0.9}},
            "lm_eval": {"scores": {"kvf_passkey_mc": {"acc": 0.5}}},
            "decode": [{"mode": "prefill", "context_len": 1024, "tokens_held": 1056, "cache_bytes": 1,
                        "peak_rss_bytes": 300 * 2**20, "decode_tokens_per_s": 250.0,
                        "prefill_tokens_per_s": 1e4}]}


def test_report_png_and_table(tmp_path):
    results = [_result("mha", "mha", 1024.0, 0.95), _result("swa", "swa", 0.25, 0.10),
               _result("swa", "swa", 0.25, 0.20, seed=1),
               _result("tc_mean", "tensor_cache", 0.5, 0.60, far_decode=0.30)]
    rows = rows_from_results(results, 32768)
    assert rows[0]["cache_bytes"] == 1024 * 32768 and rows[0]["bpb_max"] == 3.5
    paths = write_report(results, 32768, tmp_path)
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = paths["md"].read_text().splitlines()
    swa = next(line for line in table if line.startswith("| swa "))
    mha = next(line for line in table if line.startswith("| mha "))
    # mean and sample standard deviation over the two seeds: 0.15 and 0.0707
    assert "| 2 | 1,000 | 8,192 | 0.150 ± 0.071 | 0.150 ± 0.071 | 0.900 ± 0.000 |" in swa
    assert "| 1 | 1,000 | 33,554,432 | 0.950 | 0.950 | 0.900 |" in mha
    tc = next(line for line in table if line.startswith("| tc_mean "))
    assert "| 0.600 | 0.300 |" in tc  # parallel forward vs decode cache
    assert table.index(swa) < table.index(mha)  # sorted by cache bytes
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("variant,kind,seed,run") and len(csv) == 1 + len(results)
