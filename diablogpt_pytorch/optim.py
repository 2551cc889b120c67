"""The optimizer and the learning-rate schedule of DIABLOGPT training.

:func:`get_optimizer` is AdamW with weight decay on matrices only (``TrainingWrapper.get_optimizer``
calls it with the wrapper's model); :func:`lr_schedule` is the warm-up + cosine schedule the
training scripts use.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def lr_schedule(step: int, steps: int, peak: float, warmup: Optional[int] = None,
                floor: float = 0.1) -> float:
    """The main job's learning rate at ``step`` (0-based) of ``steps``: linear warm-up over
    ``warmup`` steps (default ``min(100, max(1, steps // 10))``), then cosine decay from ``peak``
    to ``floor * peak`` at the last step."""
    warmup = min(100, max(1, steps // 10)) if warmup is None else max(1, int(warmup))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_optimizer(
    model: torch.nn.Module,
    lr: float = 3e-4,
    wd: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    **kwargs,
) -> torch.optim.AdamW:
    """AdamW with two parameter groups: decayed matrices, and undecayed norms/biases/null kv.

    Uses ``model.no_weight_decay_parameter_names()`` when the model has it, else "ndim < 2".
    Both groups list parameters in ``model.named_parameters()`` order (never via sets). Frozen
    parameters are left out. Each group records its parameter names under ``'names'``. Uses the
    fused AdamW kernel where torch has one for the parameters' device (pass ``fused=False`` or
    ``foreach=...`` to choose).
    """
    if hasattr(model, "no_weight_decay_parameter_names"):
        no_decay = model.no_weight_decay_parameter_names()
    else:
        no_decay = {n for n, p in model.named_parameters() if p.ndim < 2}
    decay_names, decay, plain_names, plain = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in no_decay:
            plain_names.append(name)
            plain.append(param)
        else:
            decay_names.append(name)
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": wd, "names": decay_names},
        {"params": plain, "weight_decay": 0.0, "names": plain_names},
    ]
    groups = [g for g in groups if g["params"]]
    if "fused" not in kwargs and "foreach" not in kwargs:
        # the fused kernel (CPU and CUDA) updates all parameters in one pass per step; without it
        # torch's CPU AdamW loops over parameters one at a time
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the kernel
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
