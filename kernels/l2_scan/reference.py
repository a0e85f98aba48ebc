"""Plain torch forms of the evicted-write (L2) scan of the Tensor Cache (docs/design.md#the-exact-chunked-scan).

Per head, 0-indexed positions t, window W, decay lam, write rate eta (write, then read):

    A_t = lam * A_{t-1} + eta * k_{t-W}^T v_{t-W}     (the write term only when t - W >= 0)
    o_t = q_t A_t,            A_{-1} = initial_state (or 0)

so A_t = eta * sum_{i <= t-W} lam^(t-W-i) k_i^T v_i + lam^(t+1) A_{-1}: the decay applies at
every step, including the first. final_state is A_{T-1}: the next decode step does
A_T = lam * A_{T-1} + eta * k_{T-W}^T v_{T-W}. W = 0 is ordinary decayed linear attention.

The delta write (delta_scan_loop, delta_scan_chunked; docs/design.md#the-delta-write) shares
the delay, the write-then-read order and the state conventions.

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); decay, write_rate (H,); states (B, H, Dk, Dv).
"""
import torch


def _per_head(x: torch.Tensor) -> torch.Tensor:
    return x.view(1, -1, 1, 1)  # (H,) -> broadcast over (B, H, ., .)


def delay(x: torch.Tensor, window: int) -> torch.Tensor:
    """x'_t = x_{t-window}, zero for t < window (shifted copy along T)."""
    T = x.shape[2]
    if window == 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, min(window, T), 0))[:, :, :T]


def evicted_scan_loop(q, k, v, decay, write_rate, window, initial_state=None,
                      output_final_state=False):
    """Token-by-token recurrence, exactly the equation above (slow, obviously correct)."""
    B, H, T, Dk = q.shape
    lam, eta = _per_head(decay), _per_head(write_rate)
    A = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        A = lam * A
        if t >= window:
            s = t - window
            A = A + eta * k[:, :, s, :, None] * v[:, :, s, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], A))
    o = torch.stack(outs, dim=2) if T else q.new_zeros(B, H, 0, v.shape[-1])
    return o, (A if output_final_state else None)


def _flat_heads(q, k, v, decay, write_rate, window, initial_state):
    """The chunked scans' inputs as (B*H, ...) views, so each step is one bmm / baddbmm_ over
    all heads: q, the delayed k' and v', log lam and eta per row, and the starting state S. The
    compute dtype promotes the activations with the decay's (e.g. bf16 q, fp32 decay)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    dtype = torch.promote_types(q.dtype, decay.dtype)
    q = q.to(dtype).reshape(B * H, T, Dk)
    k = delay(k.to(dtype), window).reshape(B * H, T, Dk)
    v = delay(v.to(dtype), window).reshape(B * H, T, Dv)
    log_lam = torch.log(decay).to(dtype).repeat(B).view(B * H, 1, 1)
    eta = write_rate.to(dtype).repeat(B).view(B * H, 1, 1)
    S = (q.new_zeros(B * H, Dk, Dv) if initial_state is None
         else initial_state.to(dtype).reshape(B * H, Dk, Dv))
    return q, k, v, log_lam, eta, S


def evicted_scan_chunked(q, k, v, decay, write_rate, window, chunk_size=64, initial_state=None,
                         output_final_state=False):
    """Exact chunked form (the parallel weighted-sum scan), a loop over chunks of batched matmuls.

    Chunk n holds positions t = nC + j, j = 0..L-1 (L = C except a ragged last chunk); its
    delayed keys k'_t = k_{t-W} exist for t >= W. With S_n = A_{nC-1}:
        o_{nC+j} = lam^(j+1) q_j S_n + eta * sum_{i<=j} lam^(j-i) <q_j, k'_i> v'_i
        S_{n+1}  = lam^L S_n + eta * sum_i lam^(L-1-i) k'_i^T v'_i     (S after the last = A_{T-1})
    Every power is exp(e * log lam) with e >= 0, so nothing blows up for small lam. The delay
    is an explicit shifted copy k' = delay(k, W), v' = delay(v, W) (zero for t < W; rows j of a
    chunk with t < W are still skipped, as before). q, k', v' are cut into chunks by ONE split
    each, whose backward is one cat: O(T), where a slice per chunk would materialise a (T, d)
    gradient per chunk, O(T^2 / C). Each chunk's tiles stay in cache, which on a CPU beats one
    batched pass over all chunks (those intermediates page-fault).
    """
    B, H, T, Dk = q.shape
    Dv, C = v.shape[-1], chunk_size
    out_dtype = v.dtype
    q, k, v, log_lam, eta, S = _flat_heads(q, k, v, decay, write_rate, window, initial_state)
    j = torch.arange(C, device=q.device, dtype=q.dtype)
    lag = j[:, None] - j[None, :]
    intra = eta * torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_lam), 0.0)  # (BH,C,C)
    read = torch.exp((j + 1).view(C, 1) * log_lam)  # lam^(j+1), (BH,C,1)
    decay_C = torch.exp(C * log_lam)  # lam^C
    write_C = eta * torch.exp((C - 1 - j).view(C, 1) * log_lam)  # eta lam^(C-1-i), (BH,C,1)
    outs = []
    chunks = zip(q.split(C, dim=1), k.split(C, dim=1), v.split(C, dim=1)) if T else ()
    for n, (q_n, k_n, v_n) in enumerate(chunks):
        t0, L = n * C, q_n.shape[1]
        first = min(max(window - t0, 0), L)  # rows j < first have no evicted pair yet
        full = L == C and first == 0  # the common case: the precomputed weights, no slicing
        o_n = (q_n * (read if L == C else read[:, :L])) @ S
        S = (decay_C if L == C else torch.exp(L * log_lam)) * S
        if first < L:
            if first:
                k_n, v_n = k_n[:, first:], v_n[:, first:]  # slices of one chunk: O(C) backward
            w_intra = intra if full else intra[:, :L, first:L]
            write = write_C if full else eta * torch.exp((L - 1 - j[first:L]).view(-1, 1) * log_lam)
            # In place on fresh matmul/mul outputs (autograd keeps their inputs, not them).
            o_n.baddbmm_((q_n @ k_n.transpose(1, 2)) * w_intra, v_n)
            S.baddbmm_((k_n * write).transpose(1, 2), v_n)
        outs.append(o_n)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(B * H, 0, Dv)
    o = o.view(B, H, T, Dv).to(out_dtype)
    return o, (S.view(B, H, Dk, Dv) if output_final_state else None)


def chunk_mean_scan_loop(q, k, v, decay, write_rate, window, chunk_size, initial_state=None,
                         output_final_state=False):
    """The chunked-mean ablation, literally, token by token on the delayed stream k', v'.

    At the end of each complete chunk (delayed position e with (e+1) % C == 0):
        A <- lam * A + eta * mean_chunk(k')^T mean_chunk(v')
    and o_t = q_t A. A ragged final chunk is never written. C = 1 gives the exact scan.
    """
    B, H, T, Dk = q.shape
    C = chunk_size
    lam, eta = _per_head(decay), _per_head(write_rate)
    kd, vd = delay(k, window), delay(v, window)
    A = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        if (t + 1) % C == 0:
            mk = kd[:, :, t + 1 - C:t + 1].mean(dim=2)
            mv = vd[:, :, t + 1 - C:t + 1].mean(dim=2)
            A = lam * A + eta * mk[..., :, None] * mv[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], A))
    o = torch.stack(outs, dim=2) if T else q.new_zeros(B, H, 0, v.shape[-1])
    return o, (A if output_final_state else None)


def chunk_mean_scan(q, k, v, decay, write_rate, window, chunk_size=64, initial_state=None,
                    output_final_state=False):
    """Parallel form of chunk_mean_scan_loop: per-chunk states, then o_t = q_t A_{m(t)}.

    A_m (the state after m complete chunks) is read by positions t with (t+1) // C == m, so
    shifting q right by one position puts the readers of A_m exactly in block m.
    """
    B, H, T, Dk = q.shape
    Dv, C = v.shape[-1], chunk_size
    N = T // C  # complete chunks only
    out_dtype = v.dtype
    dtype = torch.promote_types(q.dtype, decay.dtype)  # e.g. bf16 activations, fp32 decay
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kd, vd = delay(k, window), delay(v, window)
    lam = _per_head(decay).to(dtype)
    mk = kd[:, :, :N * C].reshape(B, H, N, C, Dk).mean(dim=3)
    mv = vd[:, :, :N * C].reshape(B, H, N, C, Dv).mean(dim=3)
    eta = _per_head(write_rate).to(dtype)[..., None]
    U = eta * mk[..., :, None] * mv[..., None, :]  # (B,H,N,Dk,Dv)
    A = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dtype)
    states = [A]
    for n in range(N):
        A = lam * A + U[:, :, n]
        states.append(A)
    states = torch.stack(states, dim=2)  # (B,H,N+1,Dk,Dv)
    M = T // C + 1  # blocks of the shifted stream u = t + 1 in [1, T]
    q_shift = torch.nn.functional.pad(q, (0, 0, 1, M * C - T - 1)).view(B, H, M, C, Dk)
    o = (q_shift @ states).reshape(B, H, M * C, Dv)[:, :, 1:T + 1]
    return o.to(out_dtype), (A if output_final_state else None)


def delta_scan_loop(q, k, v, decay, write_rate, window, initial_state=None,
                    output_final_state=False):
    """The delta write, token by token (docs/design.md#the-delta-write): the evicted pair corrects
    the state's prediction k A_{t-1}, taken BEFORE the decay, then the query reads:

        A_t = lam * A_{t-1} + eta * k_{t-W}^T (v_{t-W} - k_{t-W} A_{t-1})    (t >= W)
        o_t = q_t A_t
    """
    B, H, T, Dk = q.shape
    lam, eta = _per_head(decay), _per_head(write_rate)
    A = q.new_zeros(B, H, Dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        if t >= window:
            k_s, v_s = k[:, :, t - window], v[:, :, t - window]
            error = v_s - torch.einsum("bhk,bhkv->bhv", k_s, A)
            A = lam * A + eta * k_s[..., :, None] * error[..., None, :]
        else:
            A = lam * A
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], A))
    o = torch.stack(outs, dim=2) if T else q.new_zeros(B, H, 0, v.shape[-1])
    return o, (A if output_final_state else None)


def delta_scan_chunked(q, k, v, decay, write_rate, window, chunk_size=64, initial_state=None,
                       output_final_state=False):
    """Exact chunked form of delta_scan_loop on the delayed pairs k' = delay(k, W), v'.

    Chunk of L rows (local j = 0..L-1), S the state at its start (A before its first row). The
    corrections n_j = eta (v'_j - k'_j A_{j-1}) solve a unit lower-triangular system, since
    k'_j A_{j-1} = lam^j k'_j S + sum_{i<j} lam^(j-1-i) <k'_j, k'_i> n_i:

        (I + eta (K K^T) * D) N = eta (V - diag(lam^j) K S),   D[j,i] = lam^(j-1-i) (i < j)
        O = diag(lam^(j+1)) Q S + ((Q K^T) * G) N,              G[j,i] = lam^(j-i)   (i <= j)
        S <- lam^L S + (diag(lam^(L-1-j)) K)^T N

    (docs/design.md's 1-indexed r is j + 1). A zero-padded delayed row (t < W) has k' = v' = 0,
    so its n_j is 0 and the step is the bare decay, as in the loop. Powers are exp(e log lam)
    with e >= 0, as in evicted_scan_chunked.
    """
    B, H, T, Dk = q.shape
    Dv, C = v.shape[-1], chunk_size
    out_dtype = v.dtype
    q, k, v, log_lam, eta, S = _flat_heads(q, k, v, decay, write_rate, window, initial_state)
    j = torch.arange(C, device=q.device, dtype=q.dtype)
    lag = j[:, None] - j[None, :]
    D = torch.where(lag >= 1, torch.exp((lag - 1).clamp(min=0) * log_lam), 0.0)  # (BH,C,C)
    G = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_lam), 0.0)
    eye = torch.eye(C, device=q.device, dtype=q.dtype)
    outs = []
    chunks = zip(q.split(C, dim=1), k.split(C, dim=1), v.split(C, dim=1)) if T else ()
    for q_n, k_n, v_n in chunks:
        L = q_n.shape[1]  # C except a ragged last chunk
        j_L = j[:L].view(L, 1)
        system = eye[:L, :L] + eta * (k_n @ k_n.transpose(1, 2)) * D[:, :L, :L]
        rhs = eta * (v_n - (k_n * torch.exp(j_L * log_lam)) @ S)
        N = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        o_n = (q_n * torch.exp((j_L + 1) * log_lam)) @ S \
            + ((q_n @ k_n.transpose(1, 2)) * G[:, :L, :L]) @ N
        write = torch.exp((L - 1 - j_L) * log_lam)  # lam^(L-1-j)
        S = torch.exp(L * log_lam) * S + (k_n * write).transpose(1, 2) @ N
        outs.append(o_n)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(B * H, 0, Dv)
    o = o.view(B, H, T, Dv).to(out_dtype)
    return o, (S.view(B, H, Dk, Dv) if output_final_state else None)
