"""Backbones by name: a ResNet or DenseNet body followed by an FPN, giving P2-P6.

    model = build_backbone('resnet101', norm='batch', fpn_dim=256)
    variables = model.init(key, images)                      # images [N, H, W, C] float
    pyramid, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
    pyramid['P2']  # [N, ceil(H / 4), ceil(W / 4), fpn_dim]; strides in pyramid_strides()

The input channel count is taken from the images (1 for a slice, k for 2.5D input).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models.densenet import DENSENET_BLOCKS, DenseNet
from imask_jax.models.fpn import C_LEVELS, FPN, PYRAMID_STRIDES, pyramid_strides
from imask_jax.models.norm import NORM_KINDS
from imask_jax.models.resnet import RESNET_STAGES, ResNet

Array = jax.Array
Dtype = Any

BACKBONE_NAMES = tuple(f'resnet{d}' for d in sorted(RESNET_STAGES)) + tuple(
  f'densenet{d}' for d in sorted(DENSENET_BLOCKS)
)

__all__ = ['BACKBONE_NAMES', 'BackboneFPN', 'build_backbone', 'pyramid_strides']


class BackboneFPN(nn.Module):
  """A body (images -> C2-C5) followed by an FPN (C2-C5 -> P2-P6).

  Call: `__call__(images [N, H, W, C] float, train: bool = False)` ->
  {'P2': [N, ceil(H/4), ceil(W/4), D], ..., 'P6': [N, ceil(H/64), ceil(W/64), D]} with D the
  FPN width. `train` switches batch norm to batch statistics (pass `mutable=['batch_stats']`
  to `apply` to receive the updated running averages).
  """

  body: nn.Module
  fpn: FPN

  strides: ClassVar[MappingProxyType] = MappingProxyType(PYRAMID_STRIDES)

  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    levels = self.body(images, train=train)
    return self.fpn({name: levels[name] for name in C_LEVELS})


def build_backbone(
  name: str,
  *,
  norm: str = 'batch',
  fpn_dim: int = 256,
  width: int | None = None,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  axis_name: str | None = None,
  zero_init_residual: bool = True,
  growth_rate: int | None = None,
  remat: bool = False,
) -> BackboneFPN:
  """Builds body + FPN for `name` in BACKBONE_NAMES.

  Args:
    name: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'densenet121' or
      'densenet169'.
    norm: 'batch', 'frozen_batch' or 'group' (see `imask_jax.models.norm`).
    fpn_dim: channels of every pyramid level.
    width: None for the published widths. ResNet: channels of the stem and stage 1 (64).
      DenseNet: stem channels (64); the growth rate is then width // 2 (32 at 64) unless
      `growth_rate` is given. Small values make tiny models for tests.
    dtype: activation/compute dtype (jnp.bfloat16 for mixed precision; norm statistics stay
      float32). param_dtype: parameter dtype (keep float32).
    axis_name: data-parallel axis over which batch statistics are averaged (with 'batch').
    zero_init_residual: ResNet only: start each residual branch's last norm scale at zero.
    growth_rate: DenseNet only: overrides the growth rate.
    remat: recompute the body's activations block by block in the backward pass instead of
      keeping them (less memory, one more forward through the body; same values).
  """
  if name not in BACKBONE_NAMES:
    raise ValueError(f'backbone {name!r} is not one of {BACKBONE_NAMES}')
  if norm not in NORM_KINDS:
    raise ValueError(f'backbone norm {norm!r} is not one of {NORM_KINDS}')
  if width is not None and width < 1:
    raise ValueError(f'backbone width must be >= 1 or None, got {width}')
  common = dict(norm=norm, axis_name=axis_name, remat=remat, dtype=dtype, param_dtype=param_dtype)
  if name.startswith('resnet'):
    if growth_rate is not None:
      raise ValueError(f'growth_rate applies to DenseNet only, got {growth_rate} for {name}')
    body = ResNet(
      depth=int(name[len('resnet') :]),
      width=64 if width is None else width,
      zero_init_residual=zero_init_residual,
      **common,
    )
  else:
    init_features = 64 if width is None else width
    if growth_rate is None:
      growth_rate = max(init_features // 2, 1)
    body = DenseNet(
      depth=int(name[len('densenet') :]),
      growth_rate=growth_rate,
      num_init_features=init_features,
      **common,
    )
  return BackboneFPN(body=body, fpn=FPN(features=fpn_dim, dtype=dtype, param_dtype=param_dtype))
