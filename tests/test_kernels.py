"""The model's hand-written autograd functions against torch's own differentiation.

Each function saves less than autograd would and computes its backward by hand (model.py); these
tests check those backwards numerically (``torch.autograd.gradcheck`` in float64) and against the
plain composite formula in the dtypes training uses."""

import pytest
import torch
import torch.nn.functional as F

from diablogpt_pytorch.model import _GeluDropoutLinear, _LMHeadLoss, _RMSNormFunction


def rms_norm_reference(x, gain, eps):
    x32 = x.float() if x.dtype == torch.bfloat16 else x
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * gain).to(x.dtype)


def test_rms_norm_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, gain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_composite_formula(dtype):
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


def test_gelu_linear_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _GeluDropoutLinear.apply(*a, 0.0), (h, w, b))


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


def test_lm_head_loss_without_grads_gives_the_same_loss_in_bf16():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, 8, generator=g).requires_grad_()
    weight = torch.randn(13, 8, generator=g).requires_grad_()
    labels = torch.randint(0, 13, (20,), generator=g)
    with_grads = _LMHeadLoss.apply(hidden, weight, labels, -100, 6, torch.bfloat16, True)
    with torch.no_grad():
        without = _LMHeadLoss.apply(hidden, weight, labels, -100, 6, torch.bfloat16, False)
    assert with_grads.item() == without.item()
    expected = F.cross_entropy(hidden.bfloat16().float() @ weight.bfloat16().float().t(), labels, reduction="sum")
    torch.testing.assert_close(with_grads, expected, rtol=1e-2, atol=1e-2)
    grad_h, grad_w = torch.autograd.grad(with_grads, (hidden, weight))
    ref_h, ref_w = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(grad_h, ref_h, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=3e-2, atol=3e-2)
