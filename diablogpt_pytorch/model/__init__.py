"""The RETRO model (Borgeaud et al. 2022): :class:`DIABLOGPT` and its parts.

- :mod:`.diablogpt`: :class:`DIABLOGPT`, embed -> decoder blocks -> norm -> head (Algorithm 1);
- :mod:`.block`: the decoder :class:`Block` (self-attention, CCA, feed-forward), :class:`Residual`
  and :func:`deepnet_constants`;
- :mod:`.cca`: :class:`ChunkedCrossAttention` (window alignment, rotary offsets, neighbour
  keys/values and their cache);
- :mod:`.encoder`: the neighbour :class:`Encoder`;
- :mod:`.attention`, :mod:`.feed_forward`, :mod:`.norm`, :mod:`.rotary`: the layers;
- :mod:`.cache`: :class:`DecodeCache`, the state of incremental decoding.

The compute kernels they call live in :mod:`diablogpt_pytorch.kernels`; their names that were
importable from ``diablogpt_pytorch.model`` before it became a package still are.
"""

from diablogpt_pytorch.kernels import lm_head_loss
# the kernels' autograd Functions, importable from here as before the split
from diablogpt_pytorch.kernels.feed_forward import _GeluDropoutLinear  # noqa: F401
from diablogpt_pytorch.kernels.lm_head import _LMHeadLoss  # noqa: F401
from diablogpt_pytorch.kernels.norm import _RMSNormFunction, _RMSNormLinear  # noqa: F401
from diablogpt_pytorch.kernels.rotary import _Rotation  # noqa: F401
from diablogpt_pytorch.kernels.window_attention import _WindowAttention  # noqa: F401
from diablogpt_pytorch.kernels.window_attention import attention as _attention  # noqa: F401
from diablogpt_pytorch.model.attention import CrossAttention, SelfAttention
from diablogpt_pytorch.model.block import Block, Residual, deepnet_constants
from diablogpt_pytorch.model.cache import DecodeCache
from diablogpt_pytorch.model.cca import CCAMemory, ChunkedCrossAttention
from diablogpt_pytorch.model.diablogpt import DIABLOGPT
from diablogpt_pytorch.model.encoder import Encoder, EncoderBlock
from diablogpt_pytorch.model.feed_forward import FeedForward
from diablogpt_pytorch.model.norm import RMSNorm, norm_linear
from diablogpt_pytorch.model.rotary import Rotary, apply_rotary

__all__ = ["DIABLOGPT", "DecodeCache", "deepnet_constants", "Block", "CCAMemory", "ChunkedCrossAttention",
           "CrossAttention", "Encoder", "EncoderBlock", "FeedForward", "RMSNorm", "Residual", "Rotary",
           "SelfAttention", "apply_rotary", "lm_head_loss", "norm_linear"]
