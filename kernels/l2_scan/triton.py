"""Triton chunked forward and backward of the evicted-write scan (see reference.py for the math).

One program per (batch*head, block of Dv columns) walks the chunks in order, keeping the state
S_n = A_{nC-1} (Dk x BV, fp32) in registers. Chunk n covers positions t = nC + j, of length
L = min(C, T - nC); the delayed key/value of position t is row s = t - W of k, v (index
arithmetic, no shifted copy), absent when s < 0:

    o_t     = lam^(j+1) q_t S_n + eta * sum_{i<=j} lam^(j-i) <q_t, k_{s_i}> v_{s_i}
    S_{n+1} = lam^L S_n + eta * sum_j lam^(L-1-j) k_{s_j}^T v_{s_j}      (S_N = final state)

The backward walks the chunks in reverse with E_n, the gradient reaching A_{nC+L-1} from
later positions (E_{N-1} = d final_state, E_{-1} = d initial_state):

    E_{n-1} = lam^L E_n + sum_j lam^(j+1) q_j^T dO_j

and d(log lam) = sum_t <G_t, lam A_{t-1}> (G_t the full gradient of A_t), which splits per
chunk into four non-negative-exponent terms (see the kernel). Forward states S_n are stored
for the backward. Inputs may be bf16/fp16: every dot accumulates in fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, row_ok, cols, n_cols):
    """(len(rows), len(cols)) tile of a row-major (., n_cols) matrix; masked entries are 0."""
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _fwd_kernel(q, k, v, o, h, h0, ht, log_lam, eta, T, W, H, N, Dk, Dv,
                C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                STORE_STATES: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr):
    i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: large offsets
    g = tl.load(log_lam + i_bh % H)
    e = tl.load(eta + i_bh % H)
    j = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck[:, None] < Dk) & (cv[None, :] < Dv)
    state_off = ck[:, None] * Dv + cv[None, :]
    q, k, v, o = q + i_bh * T * Dk, k + i_bh * T * Dk, v + i_bh * T * Dv, o + i_bh * T * Dv
    lag = j[:, None] - j[None, :]
    causal = lag >= 0
    S = tl.zeros((BK, BV), dtype=tl.float32)
    if USE_H0:
        S = tl.load(h0 + i_bh * Dk * Dv + state_off, mask=state_mask, other=0.0).to(tl.float32)
    for n in range(N):
        t = n * C + j
        s = t - W
        L = tl.minimum(T - n * C, C)
        qb = _load_rows(q, t, t < T, ck, Dk)
        kb = _load_rows(k, s, (s >= 0) & (t < T), ck, Dk)
        vb = _load_rows(v, s, (s >= 0) & (t < T), cv, Dv)
        if STORE_STATES:
            tl.store(h + (i_bh * N + n) * Dk * Dv + state_off, S, mask=state_mask)
        # Every power of lam is exp(e * log lam) with e >= 0.
        decay_ij = tl.where(causal, tl.exp(tl.maximum(lag, 0).to(tl.float32) * g), 0.0)
        scores = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * decay_ij * e
        read = tl.exp((j + 1).to(tl.float32) * g)
        ob = tl.dot(scores.to(vb.dtype), vb, input_precision=PRECISION)
        ob += tl.dot((qb * read[:, None]).to(qb.dtype), S.to(qb.dtype), input_precision=PRECISION)
        tl.store(o + t[:, None] * Dv + cv[None, :], ob.to(o.dtype.element_ty),
                 mask=(t[:, None] < T) & (cv[None, :] < Dv))
        write = e * tl.exp(tl.maximum(L - 1 - j, 0).to(tl.float32) * g)
        S = S * tl.exp(L.to(tl.float32) * g) + tl.dot(
            tl.trans((kb * write[:, None]).to(kb.dtype)), vb, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(ht + i_bh * Dk * Dv + state_off, S, mask=state_mask)


@triton.jit
def _bwd_kernel(q, k, v, do, h, dht, dq, dk, dv, dh0, dlog_lam, deta, log_lam, eta,
                T, W, H, N, Dk, Dv, BH, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PRECISION: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    i_bh, i_v = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: large offsets
    g = tl.load(log_lam + i_bh % H)
    e = tl.load(eta + i_bh % H)
    j = tl.arange(0, C)
    jf = j.to(tl.float32)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_mask = (ck[:, None] < Dk) & (cv[None, :] < Dv)
    state_off = ck[:, None] * Dv + cv[None, :]
    q, k = q + i_bh * T * Dk, k + i_bh * T * Dk
    v, do, dv = v + i_bh * T * Dv, do + i_bh * T * Dv, dv + i_bh * T * Dv
    # dq and dk sum over Dv blocks: each block writes its own partial, summed by the caller.
    dq, dk = dq + (i_v * BH + i_bh) * T * Dk, dk + (i_v * BH + i_bh) * T * Dk
    lag = j[:, None] - j[None, :]
    causal = lag >= 0
    decay_ij = tl.where(causal, tl.exp(tl.maximum(lag, 0).to(tl.float32) * g), 0.0)
    read = tl.exp((jf + 1) * g)
    E = tl.zeros((BK, BV), dtype=tl.float32)
    if USE_DHT:
        E = tl.load(dht + i_bh * Dk * Dv + state_off, mask=state_mask, other=0.0).to(tl.float32)
    acc_log = 0.0
    acc_eta = 0.0
    for r in range(N):
        n = N - 1 - r
        t = n * C + j
        s = t - W
        L = tl.minimum(T - n * C, C)
        Lf = L.to(tl.float32)
        kv_ok = (s >= 0) & (t < T)
        qb = _load_rows(q, t, t < T, ck, Dk)
        kb = _load_rows(k, s, kv_ok, ck, Dk)
        vb = _load_rows(v, s, kv_ok, cv, Dv)
        dob = _load_rows(do, t, t < T, cv, Dv)
        S = tl.load(h + (i_bh * N + n) * Dk * Dv + state_off, mask=state_mask, other=0.0)
        w_lag = tl.maximum(L - 1 - j, 0).to(tl.float32)
        write = tl.exp(w_lag * g)
        qk = tl.dot(qb, tl.trans(kb), input_precision=PRECISION) * decay_ij  # lam^(j-i) <q_j, k_i>
        dov_raw = tl.dot(dob, tl.trans(vb), input_precision=PRECISION)
        dov = dov_raw * decay_ij  # lam^(j-i) <dO_j, v_i>
        dq_b = e * tl.dot(dov.to(kb.dtype), kb, input_precision=PRECISION)
        dq_b += tl.dot((dob * read[:, None]).to(dob.dtype), tl.trans(S.to(dob.dtype)),
                       input_precision=PRECISION)
        dk_b = tl.dot(tl.trans(dov.to(qb.dtype)), qb, input_precision=PRECISION)
        dk_b += tl.dot((vb * write[:, None]).to(vb.dtype), tl.trans(E.to(vb.dtype)),
                       input_precision=PRECISION)
        kE = tl.dot(kb, E.to(kb.dtype), input_precision=PRECISION)  # k_i E_n, (C, BV)
        gv = tl.dot(tl.trans(qk.to(dob.dtype)), dob, input_precision=PRECISION)
        gv += kE * write[:, None]  # dv / eta = k_i G_i
        acc_eta += tl.sum(gv * vb)  # d eta = sum_s <G_s, k_s^T v_s>
        # d log lam over this chunk's L steps: (a) S_n decayed by lam^L, read by E_n;
        # (b) in-chunk writes read by E_n; (c) S_n read by q_j; (d) in-chunk writes read by q_j.
        qS = tl.dot(qb, S.to(qb.dtype), input_precision=PRECISION)
        acc_log += Lf * tl.exp(Lf * g) * tl.sum(E * S)
        acc_log += e * tl.sum(kE * vb * (w_lag * write)[:, None])
        acc_log += tl.sum(qS * dob * ((jf + 1) * read)[:, None])
        acc_log += e * tl.sum(lag.to(tl.float32) * qk * dov_raw)
        tl.store(dq + t[:, None] * Dk + ck[None, :], dq_b,
                 mask=(t[:, None] < T) & (ck[None, :] < Dk))
        tl.store(dk + s[:, None] * Dk + ck[None, :], e * dk_b,
                 mask=kv_ok[:, None] & (ck[None, :] < Dk))
        tl.store(dv + s[:, None] * Dv + cv[None, :], (e * gv).to(dv.dtype.element_ty),
                 mask=kv_ok[:, None] & (cv[None, :] < Dv))
        E = E * tl.exp(Lf * g) + tl.dot(tl.trans((qb * read[:, None]).to(qb.dtype)), dob,
                                        input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_bh * Dk * Dv + state_off, E, mask=state_mask)
    tl.store(dlog_lam + (i_v * BH + i_bh), acc_log)
    tl.store(deta + (i_v * BH + i_bh), acc_eta)


def _blocks(T, Dk, Dv, chunk_size, element_size):
    C = max(16, triton.next_power_of_2(chunk_size))  # tl.dot needs every dim >= 16
    BK = max(16, triton.next_power_of_2(Dk))
    # Shared memory (checked by compiling for sm_90): bf16 at C=64, Dk=128, BV=64 needs 57 KB
    # forward / 82 KB backward with one stage; fp32 takes BV=32 to stay near that.
    BV = min(64 if element_size <= 2 else 32, max(16, triton.next_power_of_2(Dv)))
    return C, BK, BV, triton.cdiv(T, C), triton.cdiv(Dv, BV)


class EvictedScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_lam, eta, initial_state, window, chunk_size, output_final_state):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        C, BK, BV, N, NV = _blocks(T, Dk, Dv, chunk_size, q.element_size())
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty_like(v)
        need_states = any(ctx.needs_input_grad[:6])  # S_n are kept only for a backward
        h = torch.empty(B * H, N, Dk, Dv, **f32) if need_states else o
        ht = torch.empty(B, H, Dk, Dv, **f32) if output_final_state else o
        h0 = initial_state.contiguous() if initial_state is not None else o
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        _fwd_kernel[(B * H, NV)](
            q, k, v, o, h, h0, ht, log_lam, eta, T, window, H, N, Dk, Dv, C=C, BK=BK, BV=BV,
            PRECISION=precision, STORE_STATES=need_states, USE_H0=initial_state is not None,
            STORE_FINAL=output_final_state, num_stages=2)
        ctx.save_for_backward(q, k, v, h, log_lam, eta)
        ctx.meta = (window, C, BK, BV, N, NV, precision, initial_state is not None,
                    None if initial_state is None else initial_state.dtype)
        return o, (ht if output_final_state else None)  # the state stays fp32

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, h, log_lam, eta = ctx.saved_tensors
        window, C, BK, BV, N, NV, precision, has_h0, h0_dtype = ctx.meta
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty(NV, B * H, T, Dk, **f32)
        dk = torch.zeros(NV, B * H, T, Dk, **f32)  # keys never evicted (s >= T - W) get 0
        dv = torch.zeros_like(v)
        dh0 = torch.empty(B, H, Dk, Dv, **f32)
        dlog = torch.empty(NV, B * H, **f32)
        deta = torch.empty(NV, B * H, **f32)
        _bwd_kernel[(B * H, NV)](
            q, k, v, do.contiguous().to(v.dtype), h, dht.contiguous() if dht is not None else dh0,
            dq, dk, dv, dh0, dlog, deta, log_lam, eta, T, window, H, N, Dk, Dv, B * H,
            C=C, BK=BK, BV=BV, PRECISION=precision, USE_DHT=dht is not None, STORE_DH0=has_h0,
            num_stages=1)
        dq = dq.sum(0).view(B, H, T, Dk).to(q.dtype)
        dk = dk.sum(0).view(B, H, T, Dk).to(k.dtype)
        dlog = dlog.sum(0).view(B, H).sum(0)  # per-(b, h) partials -> per head
        deta = deta.sum(0).view(B, H).sum(0)
        dh0 = dh0.to(h0_dtype) if has_h0 else None
        return dq, dk, dv, dlog, deta, dh0, None, None, None


def evicted_scan_triton(q, k, v, decay, write_rate, window, chunk_size=64, initial_state=None,
                        output_final_state=False):
    """Same contract as kernels.l2_scan.evicted_scan (exact mode). chunk_size is rounded up to a
    power of two >= 16 (it changes only the summation order, never the result)."""
    log_lam = torch.log(decay.float())  # autograd carries d log lam -> d decay
    o, final = EvictedScanFunction.apply(q, k, v, log_lam, write_rate.float(), initial_state,
                                         window, chunk_size, output_final_state)
    return o, final
