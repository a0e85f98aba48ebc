"""CPU benchmark of the evicted-write (L2) scan: per-token loop vs exact chunked vs chunk_mean.

B*H = 64 (B=4, H=16), Dk = Dv = 64, float32, forward only, window W = 64. Prints a markdown
table: time per call, speedup over the loop, max relative error vs the loop
(max |o - o_loop| / max |o_loop|). The reference loop (evicted_scan_loop) runs once per T;
the in-place loop (below) once after a warm-up.
chunk_mean computes a different function (the ablation): its "error" column is its gap to the
exact scan.

    python benchmarks/l2_scan.py [--threads N] [--chunk-sizes 32 64 128] [--lengths 512 ...]
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels.l2_scan.reference import chunk_mean_scan, evicted_scan_chunked, evicted_scan_loop  # noqa: E402


def loop_inplace(q, k, v, decay, write_rate, window):
    """The same recurrence with the state updated in place (no autograd): the fastest honest
    per-token baseline, since the reference loop's fresh 1 MB tensors per step page-fault."""
    B, H, T, Dk = q.shape
    q, v = q.reshape(B * H, T, Dk), v.reshape(B * H, T, -1)
    k = (k * write_rate.view(1, H, 1, 1)).reshape(B * H, T, Dk)
    lam = decay.repeat(B).view(B * H, 1, 1)
    A = q.new_zeros(B * H, Dk, v.shape[-1])
    outs = []
    for t in range(T):
        A.mul_(lam)
        if t >= window:
            A.baddbmm_(k[:, t - window, :, None], v[:, t - window, None, :])
        outs.append(torch.bmm(q[:, t, None], A))
    return torch.cat(outs, dim=1).view(B, H, T, -1), A.view(B, H, Dk, -1)


def timed(fn, repeats):
    """Best of `repeats` calls after one warm-up (best-of: the machine is shared)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread by default: on a shared 2-core machine two OpenMP threads stall on every op.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, D, W = 4, 16, 64, 64
    decay = torch.linspace(0.9, 0.999, H)
    write_rate = torch.full((H,), 0.5)

    print(f"command: `python {' '.join(sys.argv)}`  ")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"nproc={os.cpu_count()}, torch threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}, float32, B={B} H={H} Dk=Dv={D} W={W}\n")
    print("| T | method | C | time / call (ms) | speedup vs reference loop "
          "| speedup vs in-place loop | max rel err vs reference loop |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for T in args.lengths:
            q, k, v = (torch.randn(B, H, T, D) / D ** 0.5 for _ in range(3))
            start = time.perf_counter()
            o_loop, _ = evicted_scan_loop(q, k, v, decay, write_rate, W)
            t_loop = time.perf_counter() - start
            print(f"| {T} | loop (reference) | - | {t_loop * 1e3:.1f} | 1.0 | - | 0 |")
            t_inplace, (o, _) = timed(lambda: loop_inplace(q, k, v, decay, write_rate, W), 1)
            err = ((o - o_loop).abs().max() / o_loop.abs().max()).item()
            print(f"| {T} | loop (in-place) | - | {t_inplace * 1e3:.1f} | {t_loop / t_inplace:.1f} "
                  f"| 1.0 | {err:.1e} |")
            rows = [("exact chunked", C, lambda C=C: evicted_scan_chunked(
                q, k, v, decay, write_rate, W, C)) for C in args.chunk_sizes]
            rows += [("chunk_mean", C, lambda C=C: chunk_mean_scan(
                q, k, v, decay, write_rate, W, C)) for C in args.chunk_sizes]
            for name, C, fn in rows:
                t, (o, _) = timed(fn, args.repeats)
                err = ((o - o_loop).abs().max() / o_loop.abs().max()).item()
                print(f"| {T} | {name} | {C} | {t * 1e3:.1f} | {t_loop / t:.1f} "
                      f"| {t_inplace / t:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
