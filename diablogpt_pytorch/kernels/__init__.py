"""The model's compute kernels: each fused op beside its plain reference implementation.

The model calls only these six functions; each module documents when its fused autograd
function is used and what its reference computes:

- :func:`rms_norm` (:mod:`.norm`): ``_RMSNormFunction``, always;
- :func:`norm_linear` (:mod:`.norm`): ``_RMSNormLinear`` when gradients are enabled;
- :func:`rotate` (:mod:`.rotary`): ``_Rotation``, always;
- :func:`attention` (:mod:`.window_attention`): ``_WindowAttention`` for the short non-causal
  bf16 windows on CPU that need gradients, else ``F.scaled_dot_product_attention``;
- :func:`gelu_dropout_linear` (:mod:`.feed_forward`): ``_GeluDropoutLinear``, always;
- :func:`lm_head_loss` (:mod:`.lm_head`): ``_LMHeadLoss``, always.

``with kernels.use_reference():`` runs every reference implementation instead (composite
PyTorch ops differentiated by autograd): the way to tell a kernel bug from a model bug.
``tests/test_kernels.py`` compares the two in values and gradients.
"""

from diablogpt_pytorch.kernels._switch import reference_enabled, use_reference
from diablogpt_pytorch.kernels.feed_forward import gelu_dropout_linear
from diablogpt_pytorch.kernels.lm_head import lm_head_loss
from diablogpt_pytorch.kernels.norm import norm_linear, rms_norm
from diablogpt_pytorch.kernels.rotary import rotate
from diablogpt_pytorch.kernels.window_attention import attention

__all__ = ["attention", "gelu_dropout_linear", "lm_head_loss", "norm_linear", "reference_enabled", "rms_norm",
           "rotate", "use_reference"]
