"""Triton sliding-window attention, forward and backward, O(T W) work (contract: reference.py).

Flash-attention with the band 0 <= t + P - j <= W - 1 deciding which key blocks a query block
visits (P = L - T, the prefix of earlier keys): query block [t0, t0 + BM) reads key blocks that
cover [t0 + P - W + 1, t0 + BM + P), online softmax in fp32, and stores the row log-sum-exp.
With S attention sinks (keys j < S, seen by every query at or after them) it first visits the key
blocks of [0, S) that lie before that range, and the key blocks holding sinks meet every query
in the backward.
The backward recomputes p = exp(s - lse) tile by tile (delta = rowsum(dO * O)):

    dV += p^T dO,   dS = p (dO V^T - delta),   dK += dS^T Q scale,   dQ += dS K scale

one program per key block for dK, dV (looping over the H / G query heads that share the KV
head, so GQA needs no atomics) and one per query block for dQ. Inputs may be bf16/fp16: every
dot accumulates in fp32, and fp32 inputs use IEEE dots (no TF32).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tile(ptr, rows, n_rows, cols, n_cols):
    """(len(rows), len(cols)) tile of a row-major (n_rows, n_cols) matrix; out of range = 0."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _band(rows, cols, P, W, T, L, S):
    """Which (query t, key j) pairs attend: 0 <= t + P - j < W or a sink j < S at or before
    t + P, both in range."""
    lag = (rows + P)[:, None] - cols[None, :]
    seen = (lag >= 0) & ((lag < W) | (cols[None, :] < S))
    return seen & (rows[:, None] < T) & (cols[None, :] < L)


@triton.jit
def _key_block(it, lo, S, BN: tl.constexpr):
    """Start of the it-th key block a query block visits: first the sink blocks before `lo`,
    then the band's blocks from `lo` on (lo is a multiple of BN)."""
    sink_hi = tl.minimum((S + BN - 1) // BN * BN, lo)
    return it * BN + tl.where(it * BN < sink_hi, 0, lo - sink_hi)


@triton.jit
def _n_key_blocks(lo, hi, S, BN: tl.constexpr):
    return tl.minimum((S + BN - 1) // BN * BN, lo) // BN + (hi - lo + BN - 1) // BN


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, scale, T, L, W, S, H, N_REP, D: tl.constexpr, BD: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = i_bh // H * (H // N_REP) + i_bh % H // N_REP  # (batch, KV head), flattened
    P = L - T
    rows = i_m * BM + tl.arange(0, BM)
    cd = tl.arange(0, BD)
    q = _tile(Q + i_bh * T * D, rows, T, cd, D)
    m = tl.full((BM,), -1.0e30, tl.float32)  # finite: a fully masked tile adds exp(-inf) = 0
    l_sum = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    lo = tl.maximum(i_m * BM + P - W + 1, 0) // BN * BN
    hi = tl.minimum(i_m * BM + BM + P, L)
    for it in range(0, _n_key_blocks(lo, hi, S, BN)):
        cols = _key_block(it, lo, S, BN) + tl.arange(0, BN)
        k = _tile(K + kv * L * D, cols, L, cd, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(_band(rows, cols, P, W, T, L, S), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = _tile(V + kv * L * D, cols, L, cd, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    ok = rows < T
    o = acc / tl.where(ok, l_sum, 1.0)[:, None]
    tl.store(O + i_bh * T * D + rows[:, None] * D + cd[None, :], o.to(O.dtype.element_ty),
             mask=ok[:, None] & (cd[None, :] < D))
    tl.store(LSE + i_bh * T + rows, m + tl.log(tl.where(ok, l_sum, 1.0)), mask=ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, T, L, W, S, H, N_REP,
                     D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     PRECISION: tl.constexpr):
    i_n, i_bg = tl.program_id(0), tl.program_id(1).to(tl.int64)  # key block, (batch, KV head)
    G = H // N_REP
    P = L - T
    cols = i_n * BN + tl.arange(0, BN)
    cd = tl.arange(0, BD)
    k = _tile(K + i_bg * L * D, cols, L, cd, D)
    v = _tile(V + i_bg * L * D, cols, L, cd, D)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    lo = tl.maximum(i_n * BN - P, 0) // BM * BM  # queries t with t + P in [j, j + W - 1]
    hi = tl.minimum(i_n * BN + BN - 1 + W - P, T)
    hi = tl.where(i_n * BN < S, T, hi)  # a block holding sinks is seen by every later query
    for r in range(N_REP):
        i_bh = i_bg // G * H + i_bg % G * N_REP + r
        for t0 in range(lo, hi, BM):
            rows = t0 + tl.arange(0, BM)
            q = _tile(Q + i_bh * T * D, rows, T, cd, D)
            do = _tile(DO + i_bh * T * D, rows, T, cd, D)
            lse = tl.load(LSE + i_bh * T + rows, mask=rows < T, other=0.0)
            delta = tl.load(DELTA + i_bh * T + rows, mask=rows < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(_band(rows, cols, P, W, T, L, S), tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = (cols[:, None] < L) & (cd[None, :] < D)
    offs = i_bg * L * D + cols[:, None] * D + cd[None, :]
    tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, T, L, W, S, H, N_REP, D: tl.constexpr,
                   BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kv = i_bh // H * (H // N_REP) + i_bh % H // N_REP
    P = L - T
    rows = i_m * BM + tl.arange(0, BM)
    cd = tl.arange(0, BD)
    q = _tile(Q + i_bh * T * D, rows, T, cd, D)
    do = _tile(DO + i_bh * T * D, rows, T, cd, D)
    lse = tl.load(LSE + i_bh * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(DELTA + i_bh * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros((BM, BD), tl.float32)
    lo = tl.maximum(i_m * BM + P - W + 1, 0) // BN * BN
    hi = tl.minimum(i_m * BM + BM + P, L)
    for it in range(0, _n_key_blocks(lo, hi, S, BN)):
        cols = _key_block(it, lo, S, BN) + tl.arange(0, BN)
        k = _tile(K + kv * L * D, cols, L, cd, D)
        v = _tile(V + kv * L * D, cols, L, cd, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.where(_band(rows, cols, P, W, T, L, S), tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + i_bh * T * D + rows[:, None] * D + cd[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < T) & (cd[None, :] < D))


class WindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, block_m, block_n, sinks):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        G, L = k.shape[1], k.shape[2]
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        meta = dict(D=D, BD=max(16, triton.next_power_of_2(D)), BM=block_m, BN=block_n,
                    PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
        _fwd_kernel[(triton.cdiv(T, block_m), B * H)](q, k, v, o, lse, scale, T, L, window, sinks,
                                                      H, H // G, **meta)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.sinks, ctx.scale, ctx.meta = window, sinks, scale, meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        G, L = k.shape[1], k.shape[2]
        do = do.contiguous().to(q.dtype)
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (q, k, v, do, lse, delta)
        sizes = (ctx.scale, T, L, ctx.window, ctx.sinks, H, H // G)
        _bwd_dkdv_kernel[(triton.cdiv(L, ctx.meta["BN"]), B * G)](*args, dk, dv, *sizes, **ctx.meta)
        _bwd_dq_kernel[(triton.cdiv(T, ctx.meta["BM"]), B * H)](*args, dq, *sizes, **ctx.meta)
        return dq, dk, dv, None, None, None, None, None


def window_attention_triton(q, k, v, window: int, scale: float | None = None,
                            block_m: int = 64, block_n: int = 64, sinks: int = 0):
    """Same contract as reference.window_attention_masked; q, k, v share one head dim."""
    B, H, T, D = q.shape
    G, L = k.shape[1], k.shape[2]
    if v.shape[-1] != D or k.shape[-1] != D or H % G or L < T or window < 1:
        raise ValueError(f"need one head dim, G | H, L >= T, W >= 1; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, W={window}")
    scale = D ** -0.5 if scale is None else scale
    return WindowAttentionFunction.apply(q, k, v, window, scale, block_m, block_n, min(sinks, L))
