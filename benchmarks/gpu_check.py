"""One GPU check in one run (`make gpu-check`, under 9 minutes on one H200): markdown tables of

1. every CUDA-only test of tests/ (a test with a skipif whose reason names CUDA), run by pytest
   in a subprocess: test id, outcome, seconds; then each Triton kernel (kernels/l2_scan,
   tc_decode, tpa_decode, window_attention) against its torch reference in bf16, fp16 and
   fp32: the largest error of the outputs (and gradients, for kernels with a backward) on inputs
   rounded to the dtype, against the reference in float64 on the same rounded inputs, PASS
   when max abs error / max abs reference is within the dtype's tolerance;
2. benchmarks/gpu_kernels.py's decode (TPA's bandwidth as a fraction of this GPU's copy
   bandwidth), L2 scan (Triton and torch vs fla's chunk_simple_gla) and fused Tensor Cache
   decode tables;
3. the delta write: fla's chunk_gated_delta_rule through kernels/l2_scan/gated_delta.py vs the
   chunked torch form, forward + backward, errors, and which one the dispatch picks;
4. benchmarks/gpu_train.py: training tokens/s per family, and a train_run per family in bf16
   beside fp32.

A time guard keeps the whole under --budget seconds: each section may run until the time the
later ones need (RESERVE) is all that is left; rows past it print as skipped. The tables are
printed and written to --out (a folder gets tables.md).

    make gpu-wheels                            # here, with PyPI: the wheels the GPU machine lacks
    make gpu-check                             # on the GPU machine: system python3, no network
    python benchmarks/gpu_check.py --smoke     # the same code paths on CPU, tiny sizes
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

if "--smoke" in sys.argv:  # must precede the triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import gpu_kernels  # noqa: E402
import gpu_train  # noqa: E402
from gpu_kernels import SKIPPED, failure, out_of_time  # noqa: E402

from kernels.l2_scan import evicted_scan_loop, evicted_scan_triton  # noqa: E402
from kernels.tc_decode import tc_decode_reference, tc_decode_triton  # noqa: E402
from kernels.tpa_decode import tpa_decode_reference, tpa_decode_triton  # noqa: E402
from kernels.window_attention import window_attention_masked, window_attention_triton  # noqa: E402

# Seconds each section leaves for the sections after it: the later sections' estimated times on
# one H200 (runs 100, speed 40, delta 30, kernels 70, accuracy 30), not measured yet. The tests
# (fla autotunes on its first calls there; Triton caches compiled kernels for the rest) may take
# up to 180 s of the default 450.
RESERVE = {"tests": 270, "accuracy": 240, "kernels": 170, "delta": 140, "speed": 100, "runs": 0}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # tests/kernels'
CUDA_ONLY = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def until(self, section: str) -> float:
        """The monotonic time by which `section` must stop."""
        return self.end - RESERVE[section]


# --------------------------------------------------------------------------- 1. CUDA-only tests
class CudaOnly:
    """pytest plugin: keep the tests skipped without CUDA; one JSON line per finished test."""

    def __init__(self, log: str):
        self.log = log

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if any("cuda" in m.kwargs.get("reason", "").lower()
                                        for m in i.iter_markers("skipif"))]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":  # a setup skip or failure, or the call
            with open(self.log, "a") as f:
                f.write(json.dumps({"id": report.nodeid, "when": report.when,
                                    "outcome": report.outcome, "seconds": report.duration}) + "\n")


def run_pytest(log: str, files: list[str]) -> int:
    """The child process: pytest on `files` with the CudaOnly plugin."""
    import pytest

    return pytest.main(["-q", "-rfE", "-p", "no:cacheprovider", "-o", "addopts=", *files],
                       plugins=[CudaOnly(log)])


def cuda_tests_table(device: str, deadline: float) -> None:
    files = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").rglob("test_*.py"))
             if CUDA_ONLY.search(p.read_text())]
    env = dict(os.environ, TRITON_INTERPRET="1" if device == "cpu" else "0")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "tests.jsonl"
        try:
            done = subprocess.run([sys.executable, __file__, "--pytest-log", str(log), *files],
                                  cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=max(deadline - start, 1))
            status = f"pytest exit code {done.returncode}"
            tail = [line for line in done.stdout.splitlines()  # what failed and why, and the count
                    if line.startswith(("FAILED ", "ERROR "))] + done.stdout.splitlines()[-1:]
        except subprocess.TimeoutExpired:
            status, tail = "stopped: time budget spent (the tests below finished)", []
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print(f"\n### CUDA-only tests ({', '.join(files)}): {status}, "
          f"{time.monotonic() - start:.0f} s\n")
    print("| test | outcome | seconds |")
    print("|---|---|---|")
    for r in rows:
        outcome = r["outcome"] if r["when"] == "call" else f"{r['outcome']} at {r['when']}"
        print(f"| {r['id']} | {outcome} | {r['seconds']:.2f} |")
    print("\n" + "  \n".join(tail))
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "skipped")}
    print("\n" + ", ".join(f"{n} {o}" for o, n in counts.items()), flush=True)


# --------------------------------------------------------------------------- 1. kernel accuracy
def with_grads(fn, inputs, grad_of, seed=1):
    """fn(*inputs) -> outputs; then the gradients of a fixed random functional of outputs[0]
    with respect to inputs[i] for i in grad_of. Returns the outputs and those gradients."""
    leaves = [x.clone().requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
    outs = fn(*leaves)
    if not grad_of:
        return [o.detach() for o in outs]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(outs[0].shape, generator=gen, dtype=torch.float64).to(outs[0])
    grads = torch.autograd.grad((outs[0] * w).sum(), [leaves[i] for i in grad_of])
    return [o.detach() for o in outs] + list(grads)


class Case(NamedTuple):
    kernel: str
    fast: Callable  # inputs -> outputs (a tuple)
    reference: Callable
    inputs: tuple  # float64
    names: list  # of the outputs, then of the gradients
    grad_of: list  # the inputs whose gradients are compared
    fp32: tuple = ()  # the inputs that stay fp32 whatever the dtype (per-head scalars, L2 state)


def kernel_cases(smoke: bool, device: str):
    """One Case per Triton kernel, at the CUDA tests' sizes (--smoke: tiny ones)."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731

    def pos_rand(n, lo, hi):  # per-head scalars in [lo, hi)
        return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).to(device)

    B, H, T, D, W, C = (1, 2, 40, 16, 5, 16) if smoke else (2, 4, 300, 64, 37, 64)
    scan = (rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D), pos_rand(H, 0.5, 0.95),
            pos_rand(H, 0.5, 1.5), rnd(B, H, D, D))
    yield Case("l2_scan (evicted_scan_triton vs evicted_scan_loop)",
               lambda q, k, v, lam, eta, h0: evicted_scan_triton(q, k, v, lam, eta, W, C, h0, True),
               lambda q, k, v, lam, eta, h0: evicted_scan_loop(q, k, v, lam, eta, W, h0, True),
               scan, ["o", "final_state", "dq", "dk", "dv", "ddecay", "dwrite_rate",
                      "dinitial_state"], [0, 1, 2, 3, 4, 5], fp32=(3, 4))

    B, H, G, T, d, W = (1, 4, 2, 40, 16, 9) if smoke else (2, 8, 2, 1000, 64, 100)
    window = (rnd(B, H, T, d), rnd(B, G, T, d), rnd(B, G, T, d))
    yield Case("window_attention (window_attention_triton vs window_attention_masked)",
               lambda q, k, v: (window_attention_triton(q, k, v, W),),
               lambda q, k, v: (window_attention_masked(q, k, v, W),),
               window, ["o", "dq", "dk", "dv"], [0, 1, 2])

    B, h, g, d, W, pos = (1, 4, 2, 16, 8, 20) if smoke else (4, 8, 2, 64, 512, 4000)
    angles = torch.arange(pos - W, pos + 1, dtype=torch.float64)[:, None] * torch.rand(
        d // 2, generator=gen, dtype=torch.float64).repeat(2)
    step = (rnd(B, h, d), rnd(B, g, d), rnd(B, g, d), rnd(B, g, W, d), rnd(B, g, W, d),
            0.3 * rnd(B, h, d, d), angles.cos().to(device), angles.sin().to(device),
            pos_rand(h, 0.5, 0.95), pos_rand(h, 0.0, 1.0), pos_rand(h, 0.0, 1.0))

    def decode_step(fn):
        def run(*a):
            state = a[5].clone()  # updated in place: returned as the second output
            return fn(*a[:5], state, *a[6:], pos=pos), state
        return run
    yield Case("tc_decode (tc_decode_triton vs tc_decode_reference)",
               decode_step(tc_decode_triton), decode_step(tc_decode_reference), step,
               ["o", "state"], [], fp32=(5, 8, 9, 10))

    B, L, h, d, Rq, Rk, Rv = (1, 37, 4, 16, 6, 2, 2) if smoke else (2, 4099, 16, 64, 16, 2, 2)
    factors = (rnd(B, Rq, h), rnd(B, Rq, d), rnd(B, L, Rk, h), rnd(B, L, Rk, d), rnd(B, L, Rv, h),
               rnd(B, L, Rv, d))
    yield Case("tpa_decode (tpa_decode_triton vs tpa_decode_reference)",
               lambda *a: (tpa_decode_triton(*a),), lambda *a: (tpa_decode_reference(*a),),
               factors, ["o"], [])


def accuracy_table(device: str, dtypes, smoke: bool, deadline: float) -> None:
    print("\n### Triton kernels against their torch references: inputs rounded to the dtype (decay, "
          "write rate, gate and the L2 state stay fp32), reference in float64 on a CPU on the "
          "same rounded inputs; the worst of the outputs and gradients listed\n")
    print("| kernel | dtype | outputs | worst | max abs error | max abs reference | error / reference "
          "| tolerance | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in kernel_cases(smoke, device):
        for dtype in dtypes:
            if out_of_time(deadline):
                print(f"| {case.kernel} | {str(dtype)[6:]} | {SKIPPED} |")
                continue
            rounded = [x.to(torch.float32 if i in case.fp32 else dtype)
                       for i, x in enumerate(case.inputs)]
            try:
                got = with_grads(case.fast, rounded, case.grad_of)
                want = with_grads(case.reference, [x.cpu().double() for x in rounded], case.grad_of)
            except Exception as e:  # noqa: BLE001  (one failing kernel must not stop the check)
                print(f"| {case.kernel} | {str(dtype)[6:]} | {failure(e)} | | | | | | FAIL |")
                continue
            errors = [((a.cpu().double() - b).abs().max().item(), b.abs().max().item())
                      for a, b in zip(got, want)]
            worst = max(range(len(errors)), key=lambda i: errors[i][0] / errors[i][1])
            err, scale = errors[worst]
            ok = err / scale <= TOLERANCE[dtype]
            names = case.names
            print(f"| {case.kernel} | {str(dtype)[6:]} | {', '.join(names)} | {names[worst]} | "
                  f"{err:.2e} | {scale:.2e} | {err / scale:.1e} | {TOLERANCE[dtype]:.0e} | "
                  f"{'PASS' if ok else 'FAIL'} |", flush=True)


# --------------------------------------------------------------------------- the run
def section(title: str, *tables: Callable[[], None]) -> None:
    """The title, then each table; one that crashes is reported and the check goes on."""
    print(f"\n## {title}")
    for table in tables:
        try:
            table()
        except Exception as e:  # noqa: BLE001
            print(f"\ntable {failure(e)}", flush=True)


def _output(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(device: str) -> str:
    """What BENCHMARKS.md records with the tables: the machine, GPU, driver, torch, triton, commit."""
    import triton

    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU"
    driver = _output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").split("\n")[0]
    commit = _output("git", "rev-parse", "--short", "HEAD") or "unknown"
    return (f"machine: {platform.platform()}, {gpu}, driver {driver or 'none'}, CUDA "
            f"{torch.version.cuda or 'none'}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, commit {commit}")


class Tee:
    """stdout, also written to a file."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "w", buffering=1)  # line by line

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (interpreter)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run "
                        "(a row started before the end may finish after it)")
    parser.add_argument("--out", default=str(REPO / "runs" / "gpu-check" / "tables.md"),
                        help="where the tables go too (a folder: its tables.md)")
    parser.add_argument("--pytest-log", help=argparse.SUPPRESS)  # the child running the tests
    args, rest = parser.parse_known_args()
    if args.pytest_log:
        sys.exit(run_pytest(args.pytest_log, rest))
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the tiny CPU check")
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only add overhead on a shared CPU
    out = Path(args.out)
    out = out / "tables.md" if out.is_dir() else out
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, out)
    budget = Budget(args.budget)
    print(f"## GPU check\n\ncommand: `python {' '.join(sys.argv)}`  \n{provenance(device)}, budget "
          f"{args.budget:.0f} s" + (" (smoke: CPU, Triton interpreter, tiny sizes)" * args.smoke))
    torch.manual_seed(0)

    dtypes = [torch.float32] if args.smoke else [torch.bfloat16, torch.float16, torch.float32]
    section("1. CUDA-only tests and the Triton kernels' accuracy",
            lambda: cuda_tests_table(device, budget.until("tests")),
            lambda: accuracy_table(device, dtypes, args.smoke, budget.until("accuracy")))
    section("2. Kernel benchmarks (benchmarks/gpu_kernels.py)", lambda: gpu_kernels.run_tables(
        {"decode", "scan", "tc_decode"}, device, args.smoke, budget.until("kernels")))
    section("3. The delta write: fla's chunk_gated_delta_rule vs the torch form",
            lambda: gpu_kernels.run_tables({"delta"}, device, args.smoke, budget.until("delta")))
    section("4. Training per family (benchmarks/gpu_train.py)", lambda: gpu_train.run_tables(
        device, args.smoke, budget.until("speed"), budget.until("runs")))
    print(f"\n(total {args.budget - (budget.end - time.monotonic()):.0f} s)")


if __name__ == "__main__":
    main()
