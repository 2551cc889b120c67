"""The model's hand-written autograd functions against torch's own differentiation.

Each function saves less than autograd would and computes its backward by hand (diablogpt_pytorch/kernels/); these
tests check those backwards numerically (``torch.autograd.gradcheck`` in float64) and against the
plain composite formula in the dtypes training uses."""

import pytest
import torch
import torch.nn.functional as F

import diablogpt_pytorch.kernels.lm_head as lm_head_module
import diablogpt_pytorch.kernels.norm as norm_module

from diablogpt_pytorch.model import (DIABLOGPT, RMSNorm, Rotary, _attention, _GeluDropoutLinear, _LMHeadLoss,
                                     _RMSNormFunction, _RMSNormLinear, _WindowAttention, apply_rotary, norm_linear)


def rms_norm_reference(x, gain, eps):
    x32 = x.float() if x.dtype == torch.bfloat16 else x
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain).to(x.dtype)


@pytest.fixture(params=["large-input path", "small-input path"])
def norm_path(request, monkeypatch):
    """Run a norm test through both forward implementations (kernels.norm._rms_norm_forward picks by size)."""
    monkeypatch.setattr(norm_module, "_SMALL_NORM_INPUT", 0 if request.param == "large-input path" else 1 << 30)
    return request.param


def test_rms_norm_backward_passes_gradcheck(norm_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, gain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_composite_formula(dtype, norm_path):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 96, generator=g) * 3).to(dtype).requires_grad_()
    gain = (torch.rand(96, generator=g) + 0.5).requires_grad_()
    grad_out = torch.randn(64, 96, generator=g).to(dtype)
    ours = _RMSNormFunction.apply(x, gain, 1e-6)
    ours_grads = torch.autograd.grad(ours, (x, gain), grad_out)
    # reference: float64 composite formula on the same (rounded) inputs
    x64, gain64 = x.detach().double().requires_grad_(), gain.detach().double().requires_grad_()
    ref = rms_norm_reference(x64, gain64, 1e-6)
    ref_grads = torch.autograd.grad(ref, (x64, gain64), grad_out.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.double(), ref, **tol)
    assert ours_grads[0].dtype == dtype and ours_grads[1].dtype == torch.float32
    torch.testing.assert_close(ours_grads[0].double(), ref_grads[0], **tol)
    torch.testing.assert_close(ours_grads[1].double(), ref_grads[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_norm_linear_passes_gradcheck(bias):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, gain, w) + ((b,) if bias else ())

    def fused(x, gain, w, b=None):
        return _RMSNormLinear.apply(x, gain, 1e-6, w, b, torch.float64)

    assert torch.autograd.gradcheck(fused, inputs)


@pytest.mark.parametrize("autocast, x_dtype", [(False, torch.float32), (True, torch.float32),
                                                (True, torch.bfloat16)])  # a bf16 x: the encoder's stream
def test_norm_linear_equals_norm_then_linear(autocast, x_dtype):
    torch.manual_seed(8)
    norm, linear = RMSNorm(24), torch.nn.Linear(24, 40)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 24).to(x_dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 40)
    params = (x, norm.gamma, linear.weight, linear.bias)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm_linear(x, norm, linear) if fused else linear(norm(x))
        results.append((out, torch.autograd.grad(out, params, grad_out.to(out.dtype))))
    (out_f, grads_f), (out_u, grads_u) = results
    assert out_f.dtype == out_u.dtype == (torch.bfloat16 if autocast else torch.float32)
    if not autocast:
        torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_f, grads_u):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return
    # bf16: both round differently; each must be as close to the float64 truth as bf16 allows
    p64 = [t.detach().double().requires_grad_() for t in params]
    ref = rms_norm_reference(p64[0], p64[1], 1e-6) @ p64[2].t() + p64[3]
    ref_grads = torch.autograd.grad(ref, p64, grad_out.double())

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert err(out_f, ref) < 1e-2 and err(out_u, ref) < 1e-2
    assert grads_f[0].dtype == x_dtype
    for a, b, r in zip(grads_f, grads_u, ref_grads):
        assert a.dtype == b.dtype
        assert err(a, r) < 1e-2 and err(b, r) < 1e-2, (err(a, r), err(b, r))


@pytest.mark.parametrize("autocast", [False, True])
def test_norm_linear_saves_the_normalised_input_in_the_matmul_dtype_not_its_input(autocast):
    norm, linear = RMSNorm(24), torch.nn.Linear(24, 40)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5)  # folded into the weight, not into what is saved
    x = torch.randn(6, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm_linear(x, norm, linear)
    token_sized = [t for t in saved if t.shape == x.shape]
    assert len(token_sized) == 1
    assert token_sized[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert not any(t is x for t in saved)
    with torch.no_grad():
        normalised = rms_norm_reference(x, torch.ones(24), norm.eps).to(token_sized[0].dtype)
    torch.testing.assert_close(token_sized[0], normalised)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_gelu_linear_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _GeluDropoutLinear.apply(*a, 0.0), (h, w, b))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gelu_linear_in_bf16_matches_the_composite(p):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(4, 6, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(8, 16, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    grad_out = torch.randn(4, 6, 8, generator=g).bfloat16()
    torch.manual_seed(10)
    out = _GeluDropoutLinear.apply(h, w, b, p)
    torch.manual_seed(10)  # the same dropout mask
    a = F.gelu(h)
    if p:
        a = a * torch.empty_like(a, dtype=torch.bool).bernoulli_(1 - p) / (1 - p)
    ref = F.linear(a, w.bfloat16(), b.bfloat16())
    torch.testing.assert_close(out, ref)
    for x, y in zip(torch.autograd.grad(out, (h, w, b), grad_out), torch.autograd.grad(ref, (h, w, b), grad_out)):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-2)


def test_gelu_linear_dropout_uses_one_mask_for_forward_and_backward():
    torch.manual_seed(3)
    h = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    w = torch.eye(10, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    out = _GeluDropoutLinear.apply(h, w, b, 0.5)
    kept = out.detach() != 0  # identity weight: out is the dropped-out activation itself
    assert 0 < kept.sum() < kept.numel()
    (grad_h,) = torch.autograd.grad(out.sum(), h)
    h2 = h.detach().requires_grad_()
    (expected,) = torch.autograd.grad((F.gelu(h2) * kept * 2).sum(), h2)
    torch.testing.assert_close(grad_h, expected)


@pytest.mark.parametrize("chunk", [3, 100])
def test_lm_head_loss_passes_gradcheck_and_ignores_padding(chunk):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,), generator=g)
    labels[[2, 5]] = 0  # ignore_index

    def loss(h, w):
        return _LMHeadLoss.apply(h, w, labels, 0, chunk, torch.float64, True)

    assert torch.autograd.gradcheck(loss, (hidden, weight))
    expected = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=0, reduction="sum")
    torch.testing.assert_close(loss(hidden, weight), expected)


@pytest.mark.parametrize("group_rows", [2048, 8])
def test_lm_head_loss_without_grads_gives_the_same_loss_in_bf16(group_rows, monkeypatch):
    monkeypatch.setattr(lm_head_module, "_LM_HEAD_GROUP_ROWS", group_rows)  # 8: three row groups
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, 8, generator=g).requires_grad_()
    weight = torch.randn(13, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 13, (20,), generator=g)
    with_grads = _LMHeadLoss.apply(hidden, weight, labels, -100, 6, torch.bfloat16, True)
    with torch.no_grad():
        without = _LMHeadLoss.apply(hidden, weight, labels, -100, 6, torch.bfloat16, False)
    torch.testing.assert_close(with_grads.detach(), without)  # summed in other slices: not bitwise
    expected = F.cross_entropy(hidden.bfloat16().float() @ weight.bfloat16().float().t(), labels, reduction="sum")
    torch.testing.assert_close(with_grads, expected, rtol=1e-2, atol=1e-2)
    grad_h, grad_w = torch.autograd.grad(with_grads, (hidden, weight))
    ref_h, ref_w = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(grad_h, ref_h, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=3e-2, atol=3e-2)


def test_rotary_turns_each_pair_by_its_position_angle():
    d, theta = 8, 10000.0
    positions = torch.tensor([0, 1, 5, 37])
    x = torch.randn(2, 4, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = apply_rotary(x, Rotary(d, theta)(positions))
    angle = positions[:, None].double() * theta ** (-torch.arange(0, d, 2).double() / d)  # (len, d/2)
    a, b = x[..., : d // 2], x[..., d // 2:]
    expected = torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), dim=-1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # angles are float32
    assert out.dtype == torch.float64


def window_inputs(dtype, seed=0, batch=3, heads=2, lq=5, lk=7, d=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g, dtype=dtype).requires_grad_()
               for n in (lq, lk, lk))
    mask = torch.rand(batch, 1, 1, lk, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one key (as the model guarantees)
    return q, k, v, mask


def test_window_attention_passes_gradcheck_and_matches_sdpa():
    q, k, v, mask = window_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: _WindowAttention.apply(q, k, v, mask, 0.0), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: _WindowAttention.apply(q, k, v, None, 0.0), (q, k, v))
    out = _WindowAttention.apply(q, k, v, mask, 0.0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(mine, ref)


def test_window_attention_dropout_drops_probabilities_and_backpropagates_through_the_same_mask():
    q, k, v, mask = window_inputs(torch.float64, seed=1)
    p = 0.4
    torch.manual_seed(5)
    out = _WindowAttention.apply(q, k, v, mask, p)
    torch.manual_seed(5)  # the same draw: the function's only use of the generator
    keep = torch.empty(out.shape[:-1] + (k.shape[-2],), dtype=torch.bool).bernoulli_(1 - p)
    assert 0 < keep.sum() < keep.numel()
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) * keep / (1 - p)) @ v
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for mine, ref in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(mine, ref)


def test_window_attention_in_bf16_is_as_close_to_float64_as_sdpa_in_bf16():
    q, k, v, mask = window_inputs(torch.float64, seed=2, batch=4, heads=2, lq=64, lk=129, d=64)
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    truth = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    truth_grads = torch.autograd.grad(truth, (q, k, v), grad)
    for fn in (lambda *a: _WindowAttention.apply(*a, mask, 0.0),
               lambda *a: F.scaled_dot_product_attention(*a, attn_mask=mask)):
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = fn(*low)
        grads = torch.autograd.grad(out, low, grad.bfloat16())
        for got, want in zip((out, *grads), (truth, *truth_grads)):
            rel = (got.double() - want).norm() / want.norm()
            assert rel < 1e-2, rel  # a few bf16 roundings (2^-8 = 3.9e-3)


def test_short_non_causal_bf16_windows_take_window_attention_and_the_model_agrees_with_fp32(monkeypatch):
    bf = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16, requires_grad=True)
    calls = []
    original = _WindowAttention.apply
    monkeypatch.setattr(_WindowAttention, "apply", lambda q, k, *a: calls.append((q.shape[-2], k.shape[-2])) or original(q, k, *a))
    _attention(bf, bf, bf)
    _attention(bf, bf, bf, is_causal=True)  # causal: SDPA
    _attention(bf.detach(), bf.detach(), bf.detach())  # no gradient needed: SDPA
    _attention(bf.detach().float().requires_grad_(), bf.float(), bf.float())  # float32: SDPA
    long = torch.zeros(1, 1, 513, 8, dtype=torch.bfloat16)
    _attention(bf, long, long)  # more than 512 keys: SDPA
    assert calls == [(4, 4)]
    calls.clear()

    torch.manual_seed(0)
    model = DIABLOGPT(num_tokens=97, max_seq_len=32, enc_dim=32, enc_depth=2, dec_dim=48, dec_depth=2,
                      dec_cross_attn_layers=(1, 2), heads=2, dim_head=16, chunk_size=8)
    seq = torch.randint(1, 97, (2, 33))
    retrieved = torch.randint(1, 97, (2, 4, 2, 16))
    fp32 = model(seq, retrieved, return_loss=True)
    fp32.backward()
    fp32_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(seq, retrieved, return_loss=True)
    bf16.backward()
    # neighbour self-attention (2C, 2C) and the encoder's cross-attention (K*2C, C), per encoder
    # layer; CCA (C, null + K*2C) per CCA layer; the causal decoder attention is not among them
    assert calls == [(16, 16), (32, 8), (16, 16), (32, 8), (8, 33), (8, 33)]
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.01
    for p, ref in zip(model.parameters(), fp32_grads):
        assert torch.isfinite(p.grad).all()
        assert (p.grad - ref).norm() <= 0.05 * ref.norm() + 1e-6


def test_lm_head_loss_in_bf16_recomputes_rows_whose_label_probability_underflows():
    # row 0's label sits 200 nats below the best logit: its probability (e^-200) is far below
    # bf16's smallest normal number, and the loss must still be the exact 200, not inf or a guess
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([1, 2, 0])
    logits = hidden.detach() @ weight.detach().t()
    for with_grads in (True, False):
        with torch.set_grad_enabled(with_grads):
            loss = _LMHeadLoss.apply(hidden, weight, labels, -100, 2, torch.bfloat16, with_grads)
        per_row = F.cross_entropy(logits, labels, reduction="none")
        assert per_row[0] > 199  # the case under test: e^-200 is 0 in bf16
        torch.testing.assert_close(loss.detach(), per_row.sum(), rtol=4e-3, atol=0)
    loss = _LMHeadLoss.apply(hidden, weight, labels, -100, 2, torch.bfloat16, True)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    ref_h, ref_w = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), labels, reduction="sum"), (hidden, weight))
    torch.testing.assert_close(grad_h, ref_h, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=2e-2, atol=2e-2)


def test_rotary_backward_passes_gradcheck_and_is_the_inverse_rotation():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in Rotary(8)(torch.tensor([0, 3, 4, 9, 30])))
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, (cos, sin)), (x,))
    # a rotation is orthogonal: its backward (the transpose) undoes it
    out = apply_rotary(x, (cos, sin))
    (back,) = torch.autograd.grad(out, x, out)
    torch.testing.assert_close(back, x.detach())


class _HostSyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (bool(t), t.item(), nonzero): each is
    a stall on CUDA."""

    SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lm_head_loss_never_waits_on_the_host_per_block(dtype):
    """Issue 19 item 5: bool(t.any()) / bool(t.all()) in every 512-row block stalled CUDA. Now at
    most one host synchronisation per call (float16: none), for 12 blocks with ignored rows."""
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(48, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64)
    weight[7] = 40.0 * hidden[0] / hidden[0].norm()  # row 0 is sure of token 7...
    labels = torch.randint(1, 50, (48,), generator=g)
    labels[0] = 3  # ...so its label's probability underflows in float16 and bfloat16
    labels[[5, 17, 30]] = -100
    expected = F.cross_entropy(hidden.to(dtype).double() @ weight.to(dtype).double().t(), labels,
                               reduction="sum")
    for with_grads in (False, True):
        h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
        with torch.set_grad_enabled(with_grads), _HostSyncCounter() as syncs:
            loss = _LMHeadLoss.apply(h, w, labels, -100, 4, dtype, with_grads)
        assert syncs.count <= (0 if dtype == torch.float16 else 1)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(loss.double(), expected, rtol=tol, atol=0)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    ref = hidden.to(dtype).double().requires_grad_(), weight.to(dtype).double().requires_grad_()
    ref_h, ref_w = torch.autograd.grad(
        F.cross_entropy(ref[0] @ ref[1].t(), labels, reduction="sum"), ref)
    assert (grad_h[[5, 17, 30]] == 0).all()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # logits rounded to 8 or 11 bits
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        assert (got.double() - want).norm() <= tol * want.norm()
