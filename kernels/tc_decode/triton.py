"""Triton Tensor Cache decode step: window attention + L2 write of the evicted pair + L2 read,
one program per (batch, head), fp32 accumulation.

    window   online softmax over tiles of BW ring positions (RoPE applied on the fly from the
             cos/sin rows; slots at negative positions masked), o1 = sum p v / sum p
    L2       tiles of BI rows of A: A = lam A + eta k_e^T v_e (stored back in place),
             o2 += q[rows] A[rows, :]; with DELTA, v_e is first replaced by v_e - k_e A (one
             more pass over the tiles, reading A before any row is written)
    out      o1 + g o2
A program reads only its own head's state, so the in-place update has no race; the ring is
read only (the caller shifts in the new pair).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tc_decode_kernel(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate,
                      out, pos, scale, H, N_REP, W, D: tl.constexpr, NORMALIZE: tl.constexpr,
                      DELTA: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr, BI: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    G = H // N_REP
    kv = i_b * G + i_h // N_REP                   # this head's KV head, flattened with batch
    HALF: tl.constexpr = D // 2
    cd = tl.arange(0, BD)
    ok_d = cd < D
    partner = tl.where(cd < HALF, cd + HALF, cd - HALF)  # rotate-half: [-x2, x1]
    sign = tl.where(cd < HALF, -1.0, 1.0)

    qv = tl.load(q + i_bh * D + cd, mask=ok_d, other=0.0).to(tl.float32)
    qp = tl.load(q + i_bh * D + partner, mask=ok_d, other=0.0).to(tl.float32) * sign
    q_rot = qv * tl.load(cos + W * D + cd, mask=ok_d, other=0.0).to(tl.float32) \
        + qp * tl.load(sin + W * D + cd, mask=ok_d, other=0.0).to(tl.float32)

    # ---- L1: positions pos-W+1+j, j in [0, W): ring slot j+1 for j < W-1, the new pair at j = W-1
    m = tl.full((), -1.0e30, tl.float32)  # finite: a tile of empty slots adds exp(-inf) = 0
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BD,), tl.float32)
    for j0 in range(0, W, BW):
        j = j0 + tl.arange(0, BW)
        valid = (j < W) & (pos - W + 1 + j >= 0)
        in_ring = valid & (j < W - 1)
        is_new = valid & (j == W - 1)
        ring_row = (kv * W + j + 1)[:, None] * D
        m2 = ok_d[None, :]
        k = tl.load(ring_k + ring_row + cd[None, :], mask=in_ring[:, None] & m2, other=0.0).to(tl.float32) \
            + tl.load(k_new + kv * D + cd[None, :] + 0 * j[:, None], mask=is_new[:, None] & m2,
                      other=0.0).to(tl.float32)
        kp = tl.load(ring_k + ring_row + partner[None, :], mask=in_ring[:, None] & m2, other=0.0).to(tl.float32) \
            + tl.load(k_new + kv * D + partner[None, :] + 0 * j[:, None], mask=is_new[:, None] & m2,
                      other=0.0).to(tl.float32)
        rows = (j + 1)[:, None] * D
        c = tl.load(cos + rows + cd[None, :], mask=valid[:, None] & m2, other=0.0).to(tl.float32)
        s_ = tl.load(sin + rows + cd[None, :], mask=valid[:, None] & m2, other=0.0).to(tl.float32)
        k_rot = k * c + kp * sign[None, :] * s_
        scores = tl.sum(k_rot * q_rot[None, :], axis=1) * scale
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)
        v = tl.load(ring_v + ring_row + cd[None, :], mask=in_ring[:, None] & m2, other=0.0).to(tl.float32) \
            + tl.load(v_new + kv * D + cd[None, :] + 0 * j[:, None], mask=is_new[:, None] & m2,
                      other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    o1 = acc / l_sum

    # ---- L2: the pair in ring slot 0 (position pos-W) is evicted now
    k_e = tl.load(ring_k + kv * W * D + cd, mask=ok_d, other=0.0).to(tl.float32)
    v_e = tl.load(ring_v + kv * W * D + cd, mask=ok_d, other=0.0).to(tl.float32)
    inv = 1.0
    if NORMALIZE:
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(k_e * k_e, axis=0)), 1e-12)  # F.normalize
    lam = tl.load(decay + i_h).to(tl.float32)
    eta = tl.load(write_rate + i_h).to(tl.float32)
    if DELTA:  # the delta write corrects the prediction k_e A of the state before its decay
        for i0 in range(0, D, BI):
            ci = i0 + tl.arange(0, BI)
            ok_i = ci < D
            a = tl.load(state + (i_bh * D + ci)[:, None] * D + cd[None, :],
                        mask=ok_i[:, None] & ok_d[None, :], other=0.0).to(tl.float32)
            ke_i = tl.load(ring_k + kv * W * D + ci, mask=ok_i, other=0.0).to(tl.float32) * inv
            v_e -= tl.sum(ke_i[:, None] * a, axis=0)
    o2 = tl.zeros((BD,), tl.float32)
    for i0 in range(0, D, BI):
        ci = i0 + tl.arange(0, BI)
        ok_i = ci < D
        ptr = state + (i_bh * D + ci)[:, None] * D + cd[None, :]
        mask = ok_i[:, None] & ok_d[None, :]
        a = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        ke_i = tl.load(ring_k + kv * W * D + ci, mask=ok_i, other=0.0).to(tl.float32) * inv
        a = lam * a + eta * ke_i[:, None] * v_e[None, :]
        tl.store(ptr, a.to(state.dtype.element_ty), mask=mask)
        q_i = tl.load(q + i_bh * D + ci, mask=ok_i, other=0.0).to(tl.float32)
        o2 += tl.sum(q_i[:, None] * a, axis=0)
    g = tl.load(gate + i_h).to(tl.float32)
    tl.store(out + i_bh * D + cd, (o1 + g * o2).to(out.dtype.element_ty), mask=ok_d)


def tc_decode_triton(q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay, write_rate, gate,
                     pos: int, normalize_k: bool = True, scale: float | None = None,
                     block_w: int = 64, block_i: int = 16, delta: bool = False):
    """Same contract as tc_decode_reference (state updated in place)."""
    B, h, d = q.shape
    g, W = ring_k.shape[1], ring_k.shape[2]
    if d % 2 or h % g:
        raise ValueError(f"need an even head dim and g dividing h, got d={d}, h={h}, g={g}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    q, k_new, v_new, ring_k, ring_v, cos, sin = (
        x.contiguous() for x in (q, k_new, v_new, ring_k, ring_v, cos, sin))
    out = torch.empty_like(q)
    BD = triton.next_power_of_2(d)
    BW = min(block_w, triton.next_power_of_2(W))
    _tc_decode_kernel[(B * h,)](
        q, k_new, v_new, ring_k, ring_v, state, cos, sin, decay.contiguous(), write_rate.contiguous(),
        gate.contiguous(), out, pos, d ** -0.5 if scale is None else scale, h, h // g, W,
        D=d, NORMALIZE=normalize_k, DELTA=delta, BW=BW, BD=BD, BI=min(block_i, BD))
    return out
