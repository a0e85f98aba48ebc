"""The delta write as flash-linear-attention's gated delta rule (fla-core, optional, CUDA).

fla's rule, per token (its state S is our A; the prediction is taken AFTER the decay):

    S_t = alpha_t S_{t-1} + beta_t k_t^T (v_t - k_t alpha_t S_{t-1}),    o_t = scale q_t S_t

Ours (docs/design.md#the-delta-write), on the W-delayed pairs k', v' (prediction BEFORE the decay):

    A_t = lam A_{t-1} + eta k'_t^T (v'_t - k'_t A_{t-1})

With alpha = lam, beta = eta / lam and v scaled by lam, fla's write is
eta / lam k'^T (lam v' - lam k' A) = eta k'^T (v' - k' A): the same step. So scale 1, g = log lam
(fla takes the decay in log space), and the delay is an explicit shifted copy. fla's layout is
(B, T, H, D) where ours is (B, H, T, D); its initial and final states are ours, (B, H, Dk, Dv).
"""
import torch

from .reference import delay


def to_gated_delta_rule(q, k, v, decay, write_rate, window, initial_state=None) -> dict:
    """Our delta write's inputs -> the keyword arguments of fla's chunk_gated_delta_rule (and of
    its naive_recurrent_gated_delta_rule): q, k, v (B, T, H, D), g and beta (B, T, H) in the
    decay's dtype, scale 1, initial_state as given."""
    B, H, T, _ = q.shape
    per_token = lambda x: x.view(1, 1, H).expand(B, T, H)  # noqa: E731  (H,) -> (B, T, H)
    lam = decay.view(1, H, 1, 1)
    return dict(q=q.transpose(1, 2), k=delay(k, window).transpose(1, 2),
                v=(delay(v, window) * lam).to(v.dtype).transpose(1, 2),
                g=per_token(torch.log(decay)), beta=per_token(write_rate / decay),
                scale=1.0, initial_state=initial_state)


def delta_scan_fla(q, k, v, decay, write_rate, window, chunk_size=64, initial_state=None,
                   output_final_state=False):
    """delta_scan_chunked's contract through fla's chunk_gated_delta_rule (CUDA; fla's own chunk
    of 64: the form is exact, so chunk_size changes nothing). q's dtype is the compute dtype:
    k and v are cast to it (bf16 autocast leaves normalised keys in fp32); g, beta and the
    states are fp32. Returns o (B, H, T, Dv) in v's dtype and the fp32 final state or None."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    args = to_gated_delta_rule(q, k.to(q.dtype), v.to(q.dtype), decay.float(), write_rate.float(),
                               window, None if initial_state is None else initial_state.float())
    o, final_state = chunk_gated_delta_rule(**args, output_final_state=output_final_state)
    return o.transpose(1, 2).to(v.dtype), final_state
