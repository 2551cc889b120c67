"""Every fused kernel of diablogpt_pytorch.kernels against its reference implementation (the
switch ``kernels.use_reference()``), in values and gradients, in float32 and under bf16 autocast,
one kernel at a time and through the whole model."""

import pytest
import torch

from diablogpt_pytorch import DIABLOGPT, kernels

FUSED = ("_RMSNormFunction", "_RMSNormLinear", "_Rotation", "_WindowAttention", "_GeluDropoutLinear",
         "_LMHeadLoss")


def run(fn, inputs, reference, autocast, seed=0):
    """fn(*inputs) and its gradients for every input that requires them (a fixed random cotangent)."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t for t in inputs]
    torch.manual_seed(seed)  # the same dropout draws for both
    with kernels.use_reference(reference), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*inputs)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    wrt = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    return out, torch.autograd.grad(out, wrt, cotangent)


def assert_fused_matches_reference(fn, inputs, autocast, tol):
    (out, grads), (ref, ref_grads) = (run(fn, inputs, False, autocast), run(fn, inputs, True, autocast))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    for got, want in ((out, ref), *zip(grads, ref_grads)):
        assert got.dtype == want.dtype
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)).item()
        assert err <= tol, err


def tensors(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).requires_grad_() for shape in shapes]


CASES = [(False, torch.float32, 1e-5), (True, torch.float32, 2e-2), (True, torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("autocast, dtype, tol", CASES)
def test_rms_norm(autocast, dtype, tol):
    x, gain = tensors((6, 9, 32), (32,), dtype=dtype)
    fn = lambda x, g: kernels.rms_norm(x, g + 1, 1e-6)  # noqa: E731
    assert_fused_matches_reference(fn, [x, gain], autocast, tol)


@pytest.mark.parametrize("autocast, dtype, tol", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_norm_linear(autocast, dtype, tol, bias):
    x, gain, weight, b = tensors((6, 9, 32), (32,), (48, 32), (48,), dtype=dtype)
    fn = lambda x, g, w, b: kernels.norm_linear(x, g + 1, 1e-6, w.float(), b.float() if bias else None)  # noqa: E731
    assert_fused_matches_reference(fn, [x, gain, weight, b if bias else None], autocast, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rotate(dtype, tol):
    (x,) = tensors((2, 3, 7, 16), dtype=dtype)
    angles = torch.arange(7.0)[:, None] * torch.rand(8, generator=torch.Generator().manual_seed(2))
    cos = torch.cat((angles, angles), -1).cos().to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)
    assert_fused_matches_reference(lambda x: kernels.rotate(x, cos, sin), [x], False, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_attention(dtype, tol, dropout):
    q, k, v = tensors((3, 2, 8, 16), (3, 2, 33, 16), (3, 2, 33, 16), dtype=dtype)
    mask = torch.rand(3, 1, 1, 33, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    if dropout:  # SDPA and the window kernel draw different masks: compare without
        with torch.no_grad():
            for reference in (False, True):
                with kernels.use_reference(reference):
                    assert torch.isfinite(kernels.attention(q, k, v, mask, dropout)).all()
        return
    fn = lambda q, k, v: kernels.attention(q, k, v, attn_mask=mask)  # noqa: E731
    assert_fused_matches_reference(fn, [q, k, v], False, tol)


@pytest.mark.parametrize("autocast, dtype, tol", CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gelu_dropout_linear(autocast, dtype, tol, p):
    h, weight, bias = tensors((5, 7, 64), (16, 64), (16,), dtype=dtype)
    fn = lambda h, w, b: kernels.gelu_dropout_linear(h, w.float(), b.float(), p)  # noqa: E731
    assert_fused_matches_reference(fn, [h, weight, bias], autocast, tol)


@pytest.mark.parametrize("autocast, tol", [(False, 1e-5), (True, 2e-2)])
def test_lm_head_loss(autocast, tol):
    hidden, weight = tensors((3, 10, 16), (50, 16))
    labels = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(4))
    labels[0, :3] = 0  # padding: ignored
    fn = lambda h, w: kernels.lm_head_loss(h, w, labels, 0, 7)  # noqa: E731
    assert_fused_matches_reference(fn, [hidden, weight], autocast, tol)


def graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def tiny_model():
    torch.manual_seed(0)
    return DIABLOGPT(num_tokens=97, max_seq_len=64, enc_dim=32, enc_depth=2, dec_dim=48, dec_depth=3,
                     dec_cross_attn_layers=(1, 3), heads=2, dim_head=16, chunk_size=8, zero_init_residual=False)


@pytest.mark.parametrize("autocast, tol", [(False, 1e-4), (True, 5e-2)])
def test_the_model_computes_the_same_loss_and_gradients_with_the_reference_kernels(autocast, tol):
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    seq, retrieved = torch.randint(1, 97, (2, 33), generator=g), torch.randint(0, 97, (2, 4, 2, 16), generator=g)
    results = {}
    for reference in (False, True):
        model.zero_grad()
        with kernels.use_reference(reference), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(seq, retrieved, return_loss=True)
        nodes = graph_nodes(loss)
        used = {name for name in FUSED if any(node.startswith(name) for node in nodes)}
        # the switch reaches every kernel: none is left under it, all six run without it (in bf16,
        # where the window attention applies)
        assert used == (set() if reference else set(FUSED) - ({"_WindowAttention"} if not autocast else set()))
        loss.backward()
        results[reference] = loss.detach(), [p.grad.clone() for p in model.parameters()]
    (loss, grads), (ref_loss, ref_grads) = results[False], results[True]
    assert abs(loss.item() - ref_loss.item()) <= tol * ref_loss.item()
    for (name, _), got, want in zip(model.named_parameters(), grads, ref_grads):
        assert (got - want).norm() <= tol * want.norm() + 1e-7, name


def test_use_reference_nests_and_restores():
    assert not kernels.reference_enabled()
    with kernels.use_reference():
        assert kernels.reference_enabled()
        with kernels.use_reference(False):
            assert not kernels.reference_enabled()
        assert kernels.reference_enabled()
    with pytest.raises(RuntimeError), kernels.use_reference():
        raise RuntimeError
    assert not kernels.reference_enabled()
