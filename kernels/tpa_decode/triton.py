"""Triton TPA decode, split over the sequence (flash-decoding) with a log-sum-exp combine.

Program (b, split) takes positions i in [split*BL, split*BL + BL) and, for all h heads at once:
    ip_s   = b^k_s(i) . b_q^T          (BL, Rq)  inner products shared by the heads
    s      = sum_s (ip_s a_q) * a^k_s  (BL, h)   scaled by 1/(Rq Rk sqrt(d))
    m, l   = max_i s, sum_i exp(s - m)
    acc    = 1/Rv sum_s (exp(s - m) * a^v_s)^T b^v_s      (h, d)
The combine rescales each split by exp(m_split - m_max): o = sum acc' / sum l'.
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(a_q, b_q, a_k, b_k, a_v, b_v, m_out, l_out, acc_out, L, NS, scale,
                  H: tl.constexpr, D: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
                  RV: tl.constexpr, BL: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
                  BR: tl.constexpr, PRECISION: tl.constexpr):
    i_b, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: large offsets
    pos = i_s * BL + tl.arange(0, BL)
    ch, cd, cr = tl.arange(0, BH), tl.arange(0, BD), tl.arange(0, BR)
    ok_l, ok_h, ok_d, ok_r = pos < L, ch < H, cd < D, cr < RQ
    bq = tl.load(b_q + i_b * RQ * D + cr[:, None] * D + cd[None, :],
                 mask=ok_r[:, None] & ok_d[None, :], other=0.0)  # (BR, BD)
    aq = tl.load(a_q + i_b * RQ * H + cr[:, None] * H + ch[None, :],
                 mask=ok_r[:, None] & ok_h[None, :], other=0.0)  # (BR, BH)
    scores = tl.zeros((BL, BH), dtype=tl.float32)
    for s in tl.static_range(RK):
        row = (i_b * L + pos) * RK + s  # (b, i, s) of the (B, L, RK, .) factor tensors
        bk = tl.load(b_k + row[:, None] * D + cd[None, :], mask=ok_l[:, None] & ok_d[None, :],
                     other=0.0)
        ak = tl.load(a_k + row[:, None] * H + ch[None, :], mask=ok_l[:, None] & ok_h[None, :],
                     other=0.0)
        ip = tl.dot(bk, tl.trans(bq), input_precision=PRECISION)  # (BL, BR)
        scores += tl.dot(ip.to(aq.dtype), aq, input_precision=PRECISION) * ak
    scores = tl.where(ok_l[:, None], scores * scale, float("-inf"))
    m = tl.max(scores, axis=0)  # (BH,): every split holds at least one real position
    p = tl.exp(scores - m[None, :])
    acc = tl.zeros((BH, BD), dtype=tl.float32)
    for s in tl.static_range(RV):
        row = (i_b * L + pos) * RV + s
        bv = tl.load(b_v + row[:, None] * D + cd[None, :], mask=ok_l[:, None] & ok_d[None, :],
                     other=0.0)
        av = tl.load(a_v + row[:, None] * H + ch[None, :], mask=ok_l[:, None] & ok_h[None, :],
                     other=0.0)
        acc += tl.dot(tl.trans((p * av).to(bv.dtype)), bv, input_precision=PRECISION)
    out = i_b * NS + i_s
    tl.store(m_out + out * H + ch, m, mask=ok_h)
    tl.store(l_out + out * H + ch, tl.sum(p, axis=0), mask=ok_h)
    tl.store(acc_out + (out * H + ch[:, None]) * D + cd[None, :], acc / RV,
             mask=ok_h[:, None] & ok_d[None, :])


def tpa_decode_triton(a_q, b_q, a_k, b_k, a_v, b_v, split_size=64):
    """Same contract as tpa_decode_reference; split_size positions per program (a power of
    two >= 16)."""
    a_q, b_q, a_k, b_k, a_v, b_v = (x.contiguous() for x in (a_q, b_q, a_k, b_k, a_v, b_v))
    B, Rq, H = a_q.shape
    L, Rk, D = b_k.shape[1], b_k.shape[2], b_k.shape[3]
    Rv = a_v.shape[2]
    NS = triton.cdiv(L, split_size)
    f32 = dict(device=a_q.device, dtype=torch.float32)
    m = torch.empty(B, NS, H, **f32)
    lse = torch.empty(B, NS, H, **f32)
    acc = torch.empty(B, NS, H, D, **f32)
    _split_kernel[(B, NS)](
        a_q, b_q, a_k, b_k, a_v, b_v, m, lse, acc, L, NS, 1.0 / (Rq * Rk * math.sqrt(D)),
        H=H, D=D, RQ=Rq, RK=Rk, RV=Rv, BL=split_size, BH=max(16, triton.next_power_of_2(H)),
        BD=max(16, triton.next_power_of_2(D)), BR=max(16, triton.next_power_of_2(Rq)),
        PRECISION="ieee" if b_q.dtype == torch.float32 else "tf32")
    w = torch.exp(m - m.amax(dim=1, keepdim=True))  # log-sum-exp combine over the splits
    o = (w[..., None] * acc).sum(dim=1) / (w * lse).sum(dim=1)[..., None]
    return o.to(b_v.dtype)
