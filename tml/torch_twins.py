"""Backwards-compatible alias of ``tml.torch.twins`` + ``tml.torch.convert``.

The PyTorch side moved into the ``tml.torch`` package (issue 14); this module
re-exports the twins, the loss twins and the weight converters under their
old names so that existing code (``from tml import torch_twins as tt``)
keeps working. New code should import ``tml.torch.twins`` and
``tml.torch.convert``.
"""
from __future__ import annotations

from tml.torch.convert import (_check_kinds, _kernel_to_torch, _layer_kind,  # noqa: F401
                               _unwrap, _weight_to_flax, flax_to_torch,
                               grads_state_dict, torch_to_flax)
from tml.torch.twins import *  # noqa: F401,F403
from tml.torch.twins import (TORCH_MODELS, TRANSPOSED_PREFIX,  # noqa: F401
                             _TRUNC_STD_CORRECTION, _check_images,
                             _LandmarkEmotionHeadTorch, _linear,
                             _MixedPrecision, _nhwc_flatten, _onehot,
                             _trunc_normal_init, _UNetBodyTorch,
                             _use_dropout, autocast, autocast_dtype,
                             build_torch_model)

_TRANSPOSED_PREFIX = TRANSPOSED_PREFIX
