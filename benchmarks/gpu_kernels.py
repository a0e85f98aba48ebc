"""GPU benchmark of the kernels: TPA decode vs full-cache decode, and the L2 scan fwd+bwd.

1. Decode of one token at context L in {4k .. 128k}: TPA from factors (Triton) vs MHA, GQA and
   MLA (absorbed, latent + RoPE key) via torch SDPA, and vs TPA materialise-then-SDPA. Reports
   time per call, cache bytes read, achieved bandwidth (cache bytes / time) and that bandwidth
   as a fraction of the device's own copy bandwidth (`dst.copy_(src)`, read + write, measured
   in the same run).
2. Evicted-write L2 scan, forward + backward, T in {2k, 8k, 32k}, d_head in {64, 128}: Triton
   vs the torch chunked path vs fla's chunk_simple_gla on the same recurrence (W-delayed
   eta-scaled keys, g = log lam, scale 1; if fla-core is installed), each with its error.
3. One Tensor Cache decode step (window W + L2 read and write): the fused Triton step vs its
   torch reference, with the state bytes it reads (ring) and reads + writes (L2).
4. Sliding-window attention (training and prefill), forward and forward + backward, T up to
   32k, bf16 and fp32: the Triton kernel vs FlexAttention's sliding-window block mask vs SDPA
   per query block (the torch blocked form) vs SDPA with a T x T band mask, each with its error
   against the fp32 blocked form.
5. The delta write (docs/design.md#the-delta-write), forward + backward, T in {2k, 8k}, bf16
   and fp32, configs/gpu.yaml's heads (8 x 32): fla's chunk_gated_delta_rule through our mapping
   (kernels/l2_scan/gated_delta.py) vs the chunked torch form, each with its error against the
   torch form in float64, and which one kernels.l2_scan.delta_kernel picks (fla is not run in
   fp32: TF32 dots, so the dispatch keeps fp32 on torch).

On CPU (--smoke) fla's Triton kernels cannot run (its autotuner needs a GPU driver): the fla
rows run fla's pure-torch naive forms instead and say so.

    python benchmarks/gpu_kernels.py            # on a CUDA machine, prints markdown tables
    python benchmarks/gpu_kernels.py --tables window          # one table
    python benchmarks/gpu_kernels.py --smoke    # tiny sizes on CPU (Triton interpreter)
"""
import argparse
import os
import platform
import sys
import time
import traceback

if "--smoke" in sys.argv:  # must precede the triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels.l2_scan import (  # noqa: E402
    delta_kernel,
    delta_scan_chunked,
    delta_scan_fla,
    evicted_scan_chunked,
    evicted_scan_triton,
    to_gated_delta_rule,
)
from kernels.l2_scan.reference import delay  # noqa: E402
from kernels.tc_decode import tc_decode_reference, tc_decode_triton  # noqa: E402
from kernels.tpa_decode import tpa_decode_triton  # noqa: E402
from kernels.window_attention import band_mask, window_attention_blocked, window_attention_triton  # noqa: E402


def fla_ops(device) -> dict:
    """{"simple_gla": (name, fn), "gated_delta": (name, fn)}: fla's chunk kernels on CUDA, its
    naive torch forms on CPU (same arguments); {} when fla-core is not installed."""
    try:
        if device == "cuda":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as gated_delta
            from fla.ops.simple_gla import chunk_simple_gla as simple_gla
            return {"simple_gla": ("fla chunk_simple_gla", simple_gla),
                    "gated_delta": ("fla chunk_gated_delta_rule", gated_delta)}
        from fla.ops.gated_delta_rule import naive_chunk_gated_delta_rule as gated_delta
        from fla.ops.simple_gla.naive import naive_chunk_simple_gla as simple_gla
    except ImportError:
        return {}
    cpu = " (CPU smoke: fla's naive torch form; its Triton kernels need a GPU)"
    return {"simple_gla": ("fla naive_chunk_simple_gla" + cpu, simple_gla),
            "gated_delta": ("fla naive_chunk_gated_delta_rule" + cpu, gated_delta)}


def out_of_time(deadline) -> bool:
    """Past the caller's time budget (time.monotonic() deadline; None: no budget)."""
    return deadline is not None and time.monotonic() > deadline


SKIPPED = "skipped: time budget spent"


def failure(e: Exception) -> str:
    """An exception as one line for a table cell; its traceback goes to stderr."""
    traceback.print_exc()
    return f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}".replace("|", "/")


def rel_error(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def bench_ms(fn, device):
    """Median milliseconds per call (triton's do_bench on CUDA, a few wall-clock calls on CPU)."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(nbytes, device) -> float:
    """GB/s of one device-to-device copy of `nbytes` (bytes read + bytes written, per second)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def decode_table(lengths, B, h, d, g, Rq, Rk, Rv, d_c, d_r, dtype, device, copy_nbytes=2**30,
                 deadline=None):
    copy_gbs = copy_bandwidth(copy_nbytes, device)
    print(f"\n### Decode, one query token: B={B} h={h} d_head={d} GQA g={g}, TPA ranks "
          f"q/k/v={Rq}/{Rk}/{Rv}, MLA d_c={d_c} d_r={d_r}, {dtype}; this device's copy "
          f"bandwidth: {copy_gbs:.0f} GB/s (a {copy_nbytes / 2**20:.0f} MiB tensor, read + "
          f"write)\n")
    print("| context | method | cache bytes | time (ms) | bandwidth (GB/s) | of copy bandwidth |")
    print("|---|---|---|---|---|---|")
    elt = torch.finfo(dtype).bits // 8
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    for L in lengths:
        if out_of_time(deadline):
            print(f"| {L} | {SKIPPED} |")
            continue
        a_q, b_q = rnd(B, Rq, h), rnd(B, Rq, d)
        a_k, b_k = rnd(B, L, Rk, h), rnd(B, L, Rk, d)
        a_v, b_v = rnd(B, L, Rv, h), rnd(B, L, Rv, d)
        q = rnd(B, h, 1, d)
        k_mha, v_mha = rnd(B, h, L, d), rnd(B, h, L, d)
        k_gqa, v_gqa = rnd(B, g, L, d), rnd(B, g, L, d)
        # MLA absorbed: keys are [latent c ; rope key], values the latent c, one shared "head".
        q_mla, c, k_rope = rnd(B, h, 1, d_c + d_r), rnd(B, 1, L, d_c), rnd(B, 1, L, d_r)

        def tpa_materialised():
            K = torch.einsum("blsh,blsd->bhld", a_k, b_k) / Rk
            V = torch.einsum("blsh,blsd->bhld", a_v, b_v) / Rv
            Q = torch.einsum("brh,brd->bhd", a_q, b_q)[:, :, None] / Rq
            return F.scaled_dot_product_attention(Q, K, V)

        def mla():
            k = torch.cat([c, k_rope], dim=-1)
            return F.scaled_dot_product_attention(q_mla, k, c, enable_gqa=True)

        rows = [
            ("TPA factors (Triton)", B * L * (Rk + Rv) * (h + d),
             lambda: tpa_decode_triton(a_q, b_q, a_k, b_k, a_v, b_v)),
            ("TPA materialise + SDPA", B * L * (Rk + Rv) * (h + d), tpa_materialised),
            ("MHA SDPA", 2 * B * h * L * d,
             lambda: F.scaled_dot_product_attention(q, k_mha, v_mha)),
            (f"GQA g={g} SDPA", 2 * B * g * L * d,
             lambda: F.scaled_dot_product_attention(q, k_gqa, v_gqa, enable_gqa=True)),
            ("MLA absorbed SDPA", B * L * (d_c + d_r), mla),
        ]
        for name, elements, fn in rows:
            ms = bench_ms(fn, device)
            nbytes = elements * elt
            print(f"| {L} | {name} | {nbytes / 2**20:.2f} MiB | {ms:.3f} "
                  f"| {nbytes / ms / 1e6:.0f} | {nbytes / ms / 1e6 / copy_gbs:.2f} |", flush=True)


def scan_table(lengths, dims, B, H, window, dtype, device, deadline=None):
    print(f"\n### L2 evicted-write scan, forward + backward: B={B} H={H} W={window}, {dtype}; "
          f"error = max |o - o_ref| / max |o_ref| against the torch chunked form in fp32\n")
    print("| T | d_head | method | time (ms) | error o |")
    print("|---|---|---|---|---|")
    fla = fla_ops(device).get("simple_gla")
    for T in lengths:
        for D in dims:
            if out_of_time(deadline):
                print(f"| {T} | {D} | {SKIPPED} |")
                continue
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            decay = torch.full((H,), 0.99, device=device, requires_grad=True)
            write_rate = torch.full((H,), 0.5, device=device, requires_grad=True)
            leaves = (q, k, v, decay, write_rate)

            def fwd_bwd(scan):
                o = scan()
                torch.autograd.grad(o.float().sum(), leaves, allow_unused=True)

            rows = [("Triton", lambda: evicted_scan_triton(q, k, v, decay, write_rate, window)[0]),
                    ("torch chunked", lambda: evicted_scan_chunked(
                        q, k, v, decay, write_rate, window)[0])]
            if fla is not None:  # the same recurrence: S_t = lam S_{t-1} + (eta k'_t)^T v'_t

                def simple_gla(fn=fla[1]):
                    g = torch.log(decay).view(1, 1, H).expand(B, T, H)
                    k_eta = delay(k, window) * write_rate.view(1, H, 1, 1).to(dtype)
                    o, _ = fn(q.transpose(1, 2), k_eta.transpose(1, 2),
                              delay(v, window).transpose(1, 2), g=g, scale=1.0)
                    return o.transpose(1, 2)
                rows.append((fla[0], simple_gla))
            with torch.no_grad():
                want = evicted_scan_chunked(*(x.float() for x in leaves), window)[0]
            for name, scan in rows:
                with torch.no_grad():
                    err = rel_error(scan(), want)
                ms = bench_ms(lambda: fwd_bwd(scan), device)
                print(f"| {T} | {D} | {name} | {ms:.2f} | {err:.1e} |", flush=True)
            q = k = v = want = None  # free the device memory before the next size


def tc_decode_table(windows, B, h, g, d, dtype, device, deadline=None):
    print(f"\n### Tensor Cache decode step: B={B} h={h} g={g} d_head={d}, ring {dtype}, "
          f"L2 state fp32\n")
    print("| window | method | state bytes touched | time (ms) | bandwidth (GB/s) |")
    print("|---|---|---|---|---|")
    elt = torch.finfo(dtype).bits // 8
    for W in windows:
        if out_of_time(deadline):
            print(f"| {W} | {SKIPPED} |")
            continue
        rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        pos = 4 * W
        angles = torch.arange(pos - W, pos + 1, device=device)[:, None] * torch.rand(d, device=device)
        args = dict(q=rnd(B, h, d), k_new=rnd(B, g, d), v_new=rnd(B, g, d), ring_k=rnd(B, g, W, d),
                    ring_v=rnd(B, g, W, d), state=torch.randn(B, h, d, d, device=device),
                    cos=angles.cos().to(dtype), sin=angles.sin().to(dtype),
                    decay=torch.full((h,), 0.99, device=device),
                    write_rate=torch.full((h,), 0.5, device=device),
                    gate=torch.full((h,), 0.3, device=device))
        nbytes = 2 * B * g * W * d * elt + 2 * B * h * d * d * 4  # ring read; state read + write
        for name, fn in [("fused step (Triton)", tc_decode_triton), ("torch reference", tc_decode_reference)]:
            ms = bench_ms(lambda: fn(**args, pos=pos), device)
            print(f"| {W} | {name} | {nbytes / 2**20:.2f} MiB | {ms:.3f} | {nbytes / ms / 1e6:.0f} |",
                  flush=True)


def window_table(lengths, window, B, H, G, d, dtypes, device, compile_flex=True):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    print(f"\n### Sliding-window attention W={window}: B={B} H={H} G={G} d_head={d}; error = max "
          f"|x - x_ref| / max |x_ref| against the torch blocked form in fp32 (same inputs)\n")
    print("| T | dtype | method | forward (ms) | forward + backward (ms) | error o | error dk |")
    print("|---|---|---|---|---|---|---|")
    torch._dynamo.config.recompile_limit = 64  # a compile per (T, dtype); past 8 Flex runs eager
    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    R = H // G
    for dtype in dtypes:
        for T in lengths:
            gen = torch.Generator(device=device).manual_seed(T)
            q, k, v, do = (torch.randn(B, n, T, d, device=device, dtype=dtype, generator=gen)
                           for n in (H, G, G, H))
            block_mask = create_block_mask(  # `<= W` would admit W + 1 keys
                lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window),
                None, None, T, T, device=device)
            rows = [
                ("Triton (kernels/window_attention)",
                 lambda q, k, v: window_attention_triton(q, k, v, window)),
                ("FlexAttention, sliding-window block mask",
                 lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=R > 1)),
                ("SDPA per query block (torch blocked form)",
                 lambda q, k, v: window_attention_blocked(q, k, v, window)),
                ("SDPA, T x T band mask (KV repeated per head)",
                 lambda q, k, v: F.scaled_dot_product_attention(
                     q, k.repeat_interleave(R, 1), v.repeat_interleave(R, 1),
                     attn_mask=band_mask(T, T, window, device))),
            ]

            def with_grads(fn, dt):
                leaves = [x.detach().to(dt).requires_grad_(True) for x in (q, k, v)]
                o = fn(*leaves)
                o.backward(do.to(dt))
                return o.detach().float(), leaves[1].grad.float()

            want = with_grads(rows[2][1], torch.float32)
            for name, fn in rows:
                try:
                    got = with_grads(fn, dtype)
                    err = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
                    with torch.no_grad():
                        fwd = bench_ms(lambda: fn(q, k, v), device)
                    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
                    both = bench_ms(lambda: fn(*leaves).backward(do), device)
                    print(f"| {T} | {str(dtype)[6:]} | {name} | {fwd:.3f} | {both:.3f} "
                          f"| {err[0]:.1e} | {err[1]:.1e} |", flush=True)
                except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. T x T mask at 32k
                    reason = str(e).splitlines()[0][:80]
                    print(f"| {T} | {str(dtype)[6:]} | {name} | failed: {reason} | | | |", flush=True)
                if device == "cuda":
                    torch.cuda.empty_cache()
            q = k = v = do = block_mask = None  # free the device memory before the next size


def delta_table(lengths, B, H, D, window, dtypes, device, deadline=None):
    """The delta write's two training paths, forward + backward, each against the torch form in
    float64 on the same rounded inputs; `dispatch` marks the one kernels.l2_scan.delta_kernel
    picks for these tensors, `fastest` the faster of the two."""
    print(f"\n### Delta write, forward + backward: B={B} H={H} d_head={D} W={window}, decay 0.9-"
          f"0.999, write rate 0.5, unit keys; error = max |x - x_ref| / max |x_ref| against the "
          f"torch chunked form in float64 (same inputs)\n")
    print("| T | dtype | method | forward + backward (ms) | error o | error dk | fastest | dispatch |")
    print("|---|---|---|---|---|---|---|---|")
    fla = fla_ops(device).get("gated_delta")
    agree = []  # (dtype, T) where the dispatch picks the faster path
    for dtype in dtypes:
        for T in lengths:
            if out_of_time(deadline):
                print(f"| {T} | {str(dtype)[6:]} | {SKIPPED} |")
                continue
            gen = torch.Generator(device=device).manual_seed(T)
            q, k, v, do = (torch.randn(B, H, T, D, device=device, generator=gen) for _ in range(4))
            k = F.normalize(k, dim=-1)
            decay = 0.9 + 0.099 * torch.rand(H, device=device, generator=gen)
            write_rate = torch.full((H,), 0.5, device=device)
            rounded = [x.to(dtype) for x in (q, k, v)]

            def with_grads(scan, dt):
                leaves = [x.to(dt, copy=True).requires_grad_(True) for x in rounded]
                o = scan(*leaves, decay.to(dt if dt == torch.float64 else torch.float32),
                         write_rate, window)[0]
                o.backward(do.to(o.dtype))
                return o.detach(), leaves[1].grad

            def naive(q, k, v, decay, write_rate, window, fn=fla and fla[1]):  # fla's CPU form
                o, _ = fn(**to_gated_delta_rule(q, k, v, decay, write_rate, window))
                return o.transpose(1, 2), None

            rows = [("torch chunked (delta_scan_chunked)", delta_scan_chunked)]
            if fla is not None and device == "cuda" and dtype == torch.float32:
                print(f"| {T} | float32 | {fla[0]}: not run (its dots are TF32, so the dispatch "
                      f"keeps fp32 on torch; this saves its autotuning) |")
            elif fla is not None:
                rows.append((fla[0] + " via to_gated_delta_rule",
                             delta_scan_fla if device == "cuda" else naive))
            want = with_grads(delta_scan_chunked, torch.float64)
            picked = delta_kernel(rounded[0])
            times, errors = {}, {}
            for name, scan in rows:
                errors[name] = [rel_error(a, b) for a, b in zip(with_grads(scan, dtype), want)]
                times[name] = bench_ms(lambda: with_grads(scan, dtype), device)
            fastest = min(times, key=times.get)
            for name, scan in rows:
                chosen = scan is picked or (scan is naive and picked is delta_scan_fla)
                if chosen and name == fastest:
                    agree.append((str(dtype)[6:], T))
                print(f"| {T} | {str(dtype)[6:]} | {name} | {times[name]:.2f} | "
                      f"{errors[name][0]:.1e} | {errors[name][1]:.1e} | "
                      f"{'yes' if name == fastest else ''} | {'yes' if chosen else ''} |", flush=True)
            q = k = v = do = rounded = want = None  # free the device memory before the next size
    print(f"\nThe dispatch picks the faster path at {len(agree)} of {len(dtypes) * len(lengths)} "
          f"(dtype, T): {agree}. It keeps fp32 on the torch form whatever the speed (fla's dots "
          f"run in TF32; docs/design.md#the-delta-write).", flush=True)


def run_tables(tables, device, smoke, deadline=None):
    """The chosen tables at smoke sizes (CPU interpreter) or at full sizes (CUDA)."""
    if smoke:
        if "decode" in tables:
            decode_table([37], B=1, h=4, d=16, g=2, Rq=6, Rk=2, Rv=2, d_c=32, d_r=16,
                         dtype=torch.float32, device=device, copy_nbytes=2**22, deadline=deadline)
        if "scan" in tables:
            scan_table([40], [16], B=1, H=2, window=5, dtype=torch.float32, device=device,
                       deadline=deadline)
        if "tc_decode" in tables:
            tc_decode_table([24], B=1, h=4, g=2, d=16, dtype=torch.float32, device=device,
                            deadline=deadline)
        if "delta" in tables:
            delta_table([40], B=1, H=2, D=16, window=5, dtypes=[torch.float32], device=device,
                        deadline=deadline)
        if "window" in tables:  # FlexAttention eager: inductor's CPU compile is too slow here
            window_table([40], window=9, B=1, H=4, G=2, d=16, dtypes=[torch.float32],
                         device=device, compile_flex=False)
        return
    if "decode" in tables:
        decode_table([4096, 8192, 16384, 32768, 65536, 131072], B=4, h=32, d=128, g=8, Rq=16,
                     Rk=2, Rv=2, d_c=512, d_r=64, dtype=torch.bfloat16, device=device,
                     deadline=deadline)
    if "scan" in tables:
        scan_table([2048, 8192, 32768], [64, 128], B=2, H=16, window=256, dtype=torch.bfloat16,
                   device=device, deadline=deadline)
    if "tc_decode" in tables:
        tc_decode_table([512, 2048], B=4, h=32, g=8, d=128, dtype=torch.bfloat16, device=device,
                        deadline=deadline)
    if "delta" in tables:  # configs/gpu.yaml's heads; fla autotunes once per (dtype, d_head)
        delta_table([2048, 8192], B=4, H=8, D=32, window=64,
                    dtypes=[torch.bfloat16, torch.float32], device=device, deadline=deadline)
    if "window" in tables:
        window_table([2048, 8192, 32768], window=512, B=1, H=16, G=4, d=64,
                     dtypes=[torch.bfloat16, torch.float32], device=device)


TABLES = ["decode", "scan", "tc_decode", "window", "delta"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (interpreter)")
    parser.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the tiny CPU check")
    print(f"command: `python {' '.join(sys.argv)}`  ")
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    print(f"machine: {platform.platform()}, {name}, torch {torch.__version__}")
    torch.manual_seed(0)
    run_tables(set(args.tables), device, args.smoke)


if __name__ == "__main__":
    main()
