"""The Tensor Cache delta write (`write: delta`, docs/design.md#the-delta-write):

    A_t = lam A_{t-1} + eta k_{t-W}^T (v_{t-W} - k_{t-W} A_{t-1}),    o_t = q_t A_t

The chunked (parallel) form against a per-token loop written here in float64, forward and
backward; the layer against that loop on its own projections; decode against forward; and the
state's bound over a long sequence.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.l2_scan import evicted_scan
from kernels.tc_decode import tc_decode_triton
from kernels.tc_decode.reference import tc_decode_reference
from models import build_model
from models.rope import rope_cos_sin

from ..helpers import assert_all_close, needs_triton, rel_err, with_grads
from ..variants import ATTENTION, config

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
NAMES = ["o", "final_state", "dq", "dk", "dv", "ddecay", "dwrite_rate", "dinitial_state"]


def delta_loop(q, k, v, decay, write_rate, window, initial_state):
    """Token by token in float64, one (batch, head) at a time: the equation, nothing shared."""
    B, H, T, _ = q.shape
    o_rows, f_rows = [], []
    for b in range(B):
        for h in range(H):
            lam, eta = decay[h].double(), write_rate[h].double()
            A = initial_state[b, h].double()
            rows = []
            for t in range(T):
                A_prev = A
                A = lam * A_prev
                if t >= window:
                    k_e, v_e = k[b, h, t - window].double(), v[b, h, t - window].double()
                    A = A + eta * torch.outer(k_e, v_e - k_e @ A_prev)
                rows.append(q[b, h, t].double() @ A)
            o_rows.append(torch.stack(rows))
            f_rows.append(A)
    return torch.stack(o_rows).view(B, H, T, -1), torch.stack(f_rows).view(initial_state.shape)


def make_inputs(B, H, T, W, Dk=8, Dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, H, T, Dk), F.normalize(rnd(B, H, T, Dk), dim=-1), rnd(B, H, T, Dv)
    decay = 0.5 + 0.45 * torch.rand(H, generator=g, dtype=torch.float64)
    write_rate = 0.05 + 0.9 * torch.rand(H, generator=g, dtype=torch.float64)  # sigmoid's range
    initial_state = 0.3 * rnd(B, H, Dk, Dv)
    return [x.to(dtype) for x in (q, k, v, decay, write_rate, initial_state)]


def test_loop_is_the_scalar_recurrence():
    """Dk = Dv = 1 with k = +-1: A_t = (lam - eta) A_{t-1} + eta k v, by hand in Python floats."""
    lam, eta, W, T = 0.8, 0.3, 2, 9
    g = torch.Generator().manual_seed(4)
    q, v = torch.randn(1, 1, T, 1, generator=g), torch.randn(1, 1, T, 1, generator=g)
    k = torch.sign(torch.randn(1, 1, T, 1, generator=g))
    a, want = 0.7, []
    for t in range(T):
        if t < W:
            a = lam * a
        else:
            a = (lam - eta) * a + eta * k[0, 0, t - W, 0].item() * v[0, 0, t - W, 0].item()
        want.append(q[0, 0, t, 0].item() * a)
    o, final = delta_loop(q, k, v, torch.tensor([lam], dtype=torch.float64),
                          torch.tensor([eta], dtype=torch.float64), W,
                          torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64))
    assert rel_err(o.flatten(), torch.tensor(want, dtype=torch.float64)) <= 1e-12
    assert abs(final.item() - a) <= 1e-12 * abs(a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [1, 4, 16])
@pytest.mark.parametrize("W", [1, 3, 16])
def test_chunked_equals_per_token_loop(W, C, dtype):
    """Outputs, final state and the gradients of q, k, v, decay, write rate and initial state, at
    ragged T = 37; fp32 runs are compared with the float64 loop on the same (rounded) inputs."""
    inputs = make_inputs(2, 2, 37, W, dtype=dtype, seed=10 * W + C)
    want = with_grads(lambda *a: delta_loop(*a[:5], W, a[5]), [x.double() for x in inputs])
    got = with_grads(lambda q, k, v, lam, eta, h0: evicted_scan(
        q, k, v, lam, eta, W, C, mode="delta", initial_state=h0, output_final_state=True), inputs)
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, got, want)}
    print(f"W={W} C={C} {dtype}: max rel err {max(errors.values()):.1e}")
    assert_all_close(NAMES, got, want, TOL[dtype])
    assert all(x.abs().max() > 0 for x in want[2:]), "every gradient is informative"


def test_delta_is_not_the_outer_write():
    """Same inputs: the correction term changes the outputs by far more than the tolerance."""
    q, k, v, lam, eta, _ = make_inputs(1, 2, 30, 3)
    delta, _ = evicted_scan(q, k, v, lam, eta, 3, 4, mode="delta")
    outer, _ = evicted_scan(q, k, v, lam, eta, 3, 4, mode="exact")
    assert rel_err(delta, outer) > 1e-2


def test_state_stays_bounded_over_a_long_sequence():
    """With |k| = 1 and eta in (0, 1) the transition lam I - eta k^T k has norm
    rho = max(lam, |lam - eta|) < 1, so |A_t| <= eta max|v| / (1 - rho) at every step. Slow
    decays and large write rates (the hardest case), 4096 tokens, checked every 64."""
    B, H, T, D, W = 1, 3, 4096, 16, 5
    g = torch.Generator().manual_seed(2)
    q, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k = F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)
    lam, eta = torch.tensor([0.999, 0.99, 0.9]), torch.tensor([0.99, 0.5, 0.95])
    rho = torch.maximum(lam, (lam - eta).abs())
    bound = eta * v.norm(dim=-1).amax(dim=(0, 2)) / (1 - rho)  # per head
    k_evicted, v_evicted = F.pad(k, (0, 0, W, 0))[:, :, :T], F.pad(v, (0, 0, W, 0))[:, :, :T]
    A, norms = None, []
    for s in range(0, T, 64):  # as prefill pieces: the pairs evicted at steps s .. s+63
        piece = slice(s, s + 64)
        _, A = evicted_scan(q[:, :, piece], k_evicted[:, :, piece], v_evicted[:, :, piece], lam,
                            eta, window=0, chunk_size=16, mode="delta", initial_state=A,
                            output_final_state=True)
        norms.append(torch.linalg.matrix_norm(A, ord=2)[0])
    norms = torch.stack(norms)  # (T / 64, H)
    assert torch.isfinite(norms).all() and (norms <= bound).all(), (norms.amax(0), bound)
    assert (norms[-1] > 1.0).all()  # the memory holds something, it has not decayed away
    # the bound needs |k| = 1: keys three times longer make lam - 9 eta an expanding direction
    _, blown = evicted_scan(q[:, :, :40], 3 * k[:, :, :40], v[:, :, :40], lam, eta, W, 16,
                            mode="delta", output_final_state=True)
    blown = torch.linalg.matrix_norm(blown, ord=2)[0]
    assert torch.isfinite(blown).all() and (blown > bound).all(), (blown, bound)


def test_layer_equals_per_token_loop():
    """The layer's L2 (W-step delay, normalised un-rotated keys, eta = sigmoid(.)) against the
    float64 loop on the layer's own projections; the window part is removed by a closed gate."""
    torch.manual_seed(7)
    model = build_model(config("tensor_cache_delta")).double()
    layer = model.blocks[0].attn
    with torch.no_grad():
        layer.memory.decay_logit.uniform_(-1.0, 2.0)
        layer.memory.write_rate_raw.uniform_(-2.0, 2.0)
        x = torch.randn(1, 29, 32, dtype=torch.float64)
        lam, eta = layer.memory()
        assert torch.equal(eta, torch.sigmoid(layer.memory.write_rate_raw))
        h, W = layer.h, 5
        q = layer.q_proj(x[0]).view(29, h, -1).transpose(0, 1)[None]
        k = layer.k_proj(x[0]).view(29, h, -1).transpose(0, 1)[None]
        v = layer.v_proj(x[0]).view(29, h, -1).transpose(0, 1)[None]
        o2, _ = delta_loop(q, F.normalize(k, dim=-1), v, lam, eta, W,
                           torch.zeros(1, h, q.shape[-1], v.shape[-1], dtype=torch.float64))
        with_l2 = layer(x, pos=0)
        gate = layer.gate.clone()
        layer.gate.fill_(-torch.inf)  # sigmoid -> 0: the window part alone
        window_only = layer(x, pos=0)
        layer.gate.copy_(gate)
        want = window_only + layer.o_proj(
            (torch.sigmoid(gate).view(1, h, 1, 1) * o2).transpose(1, 2).reshape(1, 29, -1))
    assert rel_err(with_l2, want) <= 1e-12


def decode_all(model, ids, prefill):
    cache = model.init_cache(ids.shape[0])
    out = [model(ids[:, :prefill], cache=cache)] if prefill else []
    out += [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("window,chunk_size", [(5, 4), (1, 3), (3, 16)])
def test_decode_equals_forward(window, chunk_size):
    """Token-by-token decode (the fused step's delta write) and prefill-then-decode (the delta
    scan from the cached state) equal the training forward, float32."""
    torch.manual_seed(window)
    att = dict(ATTENTION["tensor_cache_delta"], window=window, chunk_size=chunk_size)
    model = build_model(config("tensor_cache_delta", attention=att)).eval()
    with torch.no_grad():
        model.blocks[0].attn.memory.write_rate_raw.uniform_(-2.0, 2.0)
        ids = torch.randint(0, 37, (2, 23))
        full = model(ids)
        errs = [(decode_all(model, ids, p) - full).abs().max().item() for p in (0, 6, 13)]
    print(f"W={window} C={chunk_size}: max |decode - forward| {max(errs):.1e}")
    assert max(errs) <= 1e-4, errs
    assert full.std() > 0.1


def decode_step_inputs(B=2, h=4, g=2, d=8, W=5, pos=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    cos, sin = rope_cos_sin(torch.arange(pos - W, pos + 1), d, 10000.0, torch.float32)
    return dict(q=r(B, h, d), k_new=r(B, g, d), v_new=r(B, g, d), ring_k=r(B, g, W, d),
                ring_v=r(B, g, W, d), state=0.3 * r(B, h, d, d), cos=cos, sin=sin,
                decay=0.5 + 0.45 * torch.rand(h, generator=gen),
                write_rate=torch.rand(h, generator=gen), gate=torch.rand(h, generator=gen)), pos


@pytest.mark.parametrize("kernel", ["reference", pytest.param("triton", marks=needs_triton)])
def test_decode_step_writes_the_prediction_error(kernel):
    """The fused step with delta=True minus the same step with delta=False is exactly the
    correction -g eta q (k_e^T (k_e A)) in the output and -eta k_e^T (k_e A) in the state."""
    a, pos = decode_step_inputs()
    step = tc_decode_reference if kernel == "reference" else tc_decode_triton
    outer, delta = dict(a, state=a["state"].clone()), dict(a, state=a["state"].clone())
    o_outer = step(**outer, pos=pos)
    o_delta = step(**delta, pos=pos, delta=True)
    A = a["state"].double()
    k_e = F.normalize(a["ring_k"][:, :, 0].double(), dim=-1).repeat_interleave(2, dim=1)
    eta = a["write_rate"].double().view(1, -1, 1, 1)
    correction = -eta * k_e[..., :, None] * torch.einsum("bhd,bhde->bhe", k_e, A)[..., None, :]
    o_corr = a["gate"].double().view(1, -1, 1) * torch.einsum("bhd,bhde->bhe", a["q"].double(),
                                                                correction)
    assert rel_err(delta["state"] - outer["state"], correction) <= 1e-5
    assert rel_err(o_delta - o_outer, o_corr) <= 1e-4
