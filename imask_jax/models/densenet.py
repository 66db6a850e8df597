"""DenseNet-121/169 bodies returning C2-C5 (strides 4, 8, 16, 32).

Architecture as Huang et al. 2017 / torchvision: a 7x7/2 stem conv, norm, ReLU, 3x3/2 max
pool; four dense blocks; between blocks a transition (norm, ReLU, 1x1 conv to
floor(compression * channels), 2x2/2 average pool); a final norm. Each dense layer is
norm, ReLU, 1x1 conv to bn_size * growth_rate, norm, ReLU, 3x3 conv to growth_rate, and its
output is concatenated to its input.

Pyramid levels (a choice, the papers give none for detection): Ck is the output of dense
block k-1 *before* the downsampling of the following transition, taken *after* that
transition's norm + ReLU, i.e. `relu(norm(block output))`. For C5 the norm is the final norm
(`relu(norm5(block4))`, exactly what the classifier sees). So every level is normalised and
activated, like ResNet's post-ReLU stage outputs, at the highest resolution its block has,
and no parameter is added: the transition's 1x1 conv and pool then continue from the same
activation. Channels: c_k = channels entering block k + layers_k * growth_rate
(DenseNet-121: 256, 512, 1024, 1024; DenseNet-169: 256, 512, 1280, 1664).

Spatial sizes follow the same rule as the ResNet bodies: ceil(H / stride). The transition's
average pool pads odd inputs at the high end and averages only the real pixels (torchvision
would floor instead; the two agree whenever H is a multiple of 32).

Initialisation: convs He-normal fan-out (like the ResNet bodies), norm scales one, biases zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models.depths import DENSENET_BLOCKS
from imask_jax.models.fpn import C_LEVELS
from imask_jax.models.norm import NORM_KINDS, NormFactory, make_norm
from imask_jax.models.remat import recomputed
from imask_jax.models.resnet import check_images, conv

Array = jax.Array
Dtype = Any

# DENSENET_BLOCKS (depths.py): depth -> dense layers per block (Huang et al. 2017, Table 1).


class DenseLayer(nn.Module):
  """norm-ReLU-1x1 conv-norm-ReLU-3x3 conv. [N, H, W, Cin] -> new features [N, H, W, growth]."""

  growth_rate: int
  bn_size: int
  norm: NormFactory
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.relu(self.norm(name='norm1')(x))
    y = conv(self.bn_size * self.growth_rate, 1, name='conv1', **kw)(y)
    y = nn.relu(self.norm(name='norm2')(y))
    return conv(self.growth_rate, 3, name='conv2', **kw)(y)


class DenseNet(nn.Module):
  """DenseNet body: NHWC images -> {'C2': ..., 'C5': ...} (see the module docstring).

  Attributes:
    depth: 121 or 169.
    growth_rate: channels each dense layer adds (32 in the published nets).
    num_init_features: channels of the stem conv (64 in the published nets).
    bn_size: bottleneck width of a dense layer, in multiples of growth_rate (4).
    compression: channel reduction of a transition (0.5).
    block_sizes: dense layers per block, overriding the depth's published ones (for tiny
      test models); None uses DENSENET_BLOCKS[depth].
    norm: 'batch', 'frozen_batch' or 'group' (see `imask_jax.models.norm`).
    axis_name: data-parallel axis over which batch statistics are averaged (or None).
    remat: recompute each dense layer's norm, ReLU and bottleneck activations in the backward
      pass (`remat.recomputed`) instead of keeping them: only the concatenated features stay alive.
    stem_skip: also return the stem's activation (stride 2: after its norm and ReLU, before
      the max pool) under 'stem', for the U-Net's encoder (models/unet.py).
    num_classes: when set, adds the classification top (global average pool of C5 + dense
      layer), returned under 'logits'. Only used to compare parameter counts.
    dtype: activation/compute dtype; norms compute statistics in float32.
    param_dtype: parameter dtype.

  Call: `__call__(images [N, H, W, C] float, train: bool)`. Returns C2..C5 in `dtype` with
  spatial size ceil(H / stride) for strides 4, 8, 16, 32 and channels `level_channels()`.
  """

  depth: int = 121
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  block_sizes: tuple[int, int, int, int] | None = None
  norm: str = 'batch'
  axis_name: str | None = None
  remat: bool = False
  stem_skip: bool = False
  num_classes: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def level_channels(self) -> dict[str, int]:
    """Channels of C2-C5, and (key 'transition{k}') of each transition's output."""
    blocks = self._blocks()
    channels: dict[str, int] = {}
    entering = self.num_init_features
    for k, num_layers in enumerate(blocks):
      out = entering + num_layers * self.growth_rate
      channels[C_LEVELS[k]] = out
      entering = int(out * self.compression)
      if k < len(blocks) - 1:
        channels[f'transition{k + 1}'] = entering
    return channels

  def _blocks(self) -> tuple[int, int, int, int]:
    if self.block_sizes is not None:
      if len(self.block_sizes) != 4 or min(self.block_sizes) < 1:
        raise ValueError(
          f'DenseNet block_sizes must be 4 positive layer counts, got {self.block_sizes}'
        )
    elif self.depth not in DENSENET_BLOCKS:
      raise ValueError(f'DenseNet depth {self.depth} is not one of {sorted(DENSENET_BLOCKS)}')
    for field in ('growth_rate', 'num_init_features', 'bn_size'):
      if getattr(self, field) < 1:
        raise ValueError(f'DenseNet {field} must be >= 1, got {getattr(self, field)}')
    if not 0.0 < self.compression <= 1.0:
      raise ValueError(f'DenseNet compression must be in (0, 1], got {self.compression}')
    if self.norm not in NORM_KINDS:
      raise ValueError(f'DenseNet norm {self.norm!r} is not one of {NORM_KINDS}')
    if self.block_sizes is not None:
      return tuple(self.block_sizes)
    return DENSENET_BLOCKS[self.depth]

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    check_images(images, f'DenseNet-{self.depth}')
    blocks = self._blocks()
    channels = self.level_channels()
    norm = make_norm(
      self.norm,
      train=train,
      axis_name=self.axis_name,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = images.astype(self.dtype)
    x = conv(self.num_init_features, 7, stride=2, name='stem_conv', **kw)(x)
    x = nn.relu(norm(name='stem_norm')(x))
    features = {'stem': x} if self.stem_skip else {}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for k, num_layers in enumerate(blocks):
      for index in range(num_layers):
        layer = DenseLayer(
          growth_rate=self.growth_rate,
          bn_size=self.bn_size,
          norm=norm,
          name=f'block{k + 1}_layer{index}',
          **kw,
        )
        new = recomputed(layer, x) if self.remat else layer(x)
        x = jnp.concatenate([x, new], axis=-1)
      last = k == len(blocks) - 1
      # The transition's (or the final) norm + ReLU output is the pyramid level.
      x = nn.relu(norm(name='final_norm' if last else f'transition{k + 1}_norm')(x))
      features[C_LEVELS[k]] = x
      if not last:
        x = conv(channels[f'transition{k + 1}'], 1, name=f'transition{k + 1}_conv', **kw)(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)

    if self.num_classes is not None:
      pooled = x.astype(jnp.float32).mean(axis=(1, 2))
      features['logits'] = nn.Dense(
        self.num_classes, param_dtype=self.param_dtype, name='classifier'
      )(pooled)
    return features
