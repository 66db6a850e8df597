"""ResNet-18/34/50/101/152 bodies returning C2-C5 (strides 4, 8, 16, 32).

Architecture as torchvision's ResNet (v1.5): a 7x7/2 stem conv, norm, ReLU and 3x3/2 max pool;
four stages of basic blocks (18, 34) or bottleneck blocks (50, 101, 152) whose first block
downsamples (except in stage 1) with the stride on the 3x3 conv, and a 1x1 conv + norm
projection shortcut where the shape changes. Convs have no bias (a norm follows each).

Padding is symmetric (`k // 2` on each side), as in torchvision, so a stride-2 layer maps
H to ceil(H / 2) and level Ck has spatial size ceil(H / stride) for any H. (Cell i of a level
with stride s is centred on input pixel index s * i, not on the footprint centre.)

Initialisation (there are no pretrained weights to load): convs He-normal with fan-out
(std = sqrt(2 / (k * k * out_channels))), norm scales one and biases zero, and by default
the last norm scale of every residual branch zero so that each block starts as the identity
(`zero_init_residual`, as in Goyal et al. 2017), which keeps deep nets trainable from scratch.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models import layers
from imask_jax.models.depths import RESNET_LAYOUTS
from imask_jax.models.fpn import C_LEVELS
from imask_jax.models.norm import NORM_KINDS, NormFactory, make_norm
from imask_jax.models.remat import recomputed

Array = jax.Array
Dtype = Any

# He-normal, fan-out mode: std = sqrt(2 / (kh * kw * out_channels)).
HE_NORMAL_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
  features: int,
  kernel: int,
  *,
  stride: int = 1,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """Bias-free square conv with symmetric `kernel // 2` padding and He fan-out init."""
  pad = kernel // 2
  return layers.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=HE_NORMAL_FAN_OUT,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


def check_images(images: Array, owner: str) -> None:
  """Raises a ValueError unless `images` is a float NHWC batch."""
  if images.ndim != 4:
    raise ValueError(f'{owner} expects NHWC images [N, H, W, C], got shape {images.shape}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'{owner} expects floating-point images, got dtype {images.dtype}')


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection. [N, H, W, Cin] -> [N, H/s, W/s, planes]."""

  planes: int
  stride: int
  norm: NormFactory
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = conv(self.planes, 3, stride=self.stride, name='conv1', **kw)(x)
    y = nn.relu(self.norm(name='norm1')(y))
    y = conv(self.planes, 3, name='conv2', **kw)(y)
    y = self.norm(name='norm2', zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + shortcut(x, self.planes, self.stride, self.norm, **kw))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand by 4, residual connection.

  [N, H, W, Cin] -> [N, H/s, W/s, 4 * planes].
  """

  planes: int
  stride: int
  norm: NormFactory
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    out_channels = self.planes * self.expansion
    y = conv(self.planes, 1, name='conv1', **kw)(x)
    y = nn.relu(self.norm(name='norm1')(y))
    y = conv(self.planes, 3, stride=self.stride, name='conv2', **kw)(y)
    y = nn.relu(self.norm(name='norm2')(y))
    y = conv(out_channels, 1, name='conv3', **kw)(y)
    y = self.norm(name='norm3', zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + shortcut(x, out_channels, self.stride, self.norm, **kw))


def shortcut(x: Array, out_channels: int, stride: int, norm: NormFactory, **conv_kw) -> Array:
  """Identity, or a strided 1x1 conv + norm projection when the shape changes.

  Called from inside a block's compact `__call__`, so its layers belong to that block.
  """
  if stride == 1 and x.shape[-1] == out_channels:
    return x
  y = conv(out_channels, 1, stride=stride, name='downsample_conv', **conv_kw)(x)
  return norm(name='downsample_norm')(y)


# depth -> (block type, blocks per stage), as in He et al. 2016, Table 1 (depths.RESNET_LAYOUTS).
RESNET_STAGES: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
  depth: ({'basic': BasicBlock, 'bottleneck': Bottleneck}[kind], stages)
  for depth, (kind, stages) in RESNET_LAYOUTS.items()
}


class ResNet(nn.Module):
  """ResNet body: NHWC images -> {'C2': ..., 'C5': ...}.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    width: channels of the stem and of stage 1's 3x3 convs (64 in the published nets); stage
      k uses width * 2**(k-1), times 4 at the output of bottleneck blocks.
    norm: 'batch', 'frozen_batch' or 'group' (see `imask_jax.models.norm`).
    axis_name: data-parallel axis over which batch statistics are averaged (or None).
    zero_init_residual: start the last norm scale of each residual branch at zero.
    remat: recompute each residual block's activations in the backward pass instead of
      keeping them (`remat.recomputed`): only the blocks' inputs stay alive between the
      forward and the backward, at the cost of a second forward through the body. The values
      and the parameter tree are the same.
    stem_skip: also return the stem's activation (stride 2: after its norm and ReLU, before
      the max pool) under 'stem', for the U-Net's encoder (models/unet.py).
    num_classes: when set, adds a classification top (global average pool of C5 + dense
      layer) whose output is returned under 'logits'. Only used to compare parameter
      counts with the published networks.
    dtype: activation/compute dtype (e.g. jnp.bfloat16); norms compute statistics in float32.
    param_dtype: parameter dtype.

  Call: `__call__(images [N, H, W, C] float, train: bool)`. Returns float `dtype` arrays
  C2 [N, ceil(H/4), ceil(W/4), c2], ..., C5 [N, ceil(H/32), ceil(W/32), c5] with
  c_k = width * 2**(k-2) * expansion (expansion 1 for basic, 4 for bottleneck blocks).
  """

  depth: int = 50
  width: int = 64
  norm: str = 'batch'
  axis_name: str | None = None
  zero_init_residual: bool = True
  remat: bool = False
  stem_skip: bool = False
  num_classes: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def level_channels(self) -> dict[str, int]:
    """Channels of C2-C5 for this depth and width."""
    block, _ = self._stages()
    return {level: self.width * 2**k * block.expansion for k, level in enumerate(C_LEVELS)}

  def _stages(self) -> tuple[type[nn.Module], tuple[int, int, int, int]]:
    if self.depth not in RESNET_STAGES:
      raise ValueError(f'ResNet depth {self.depth} is not one of {sorted(RESNET_STAGES)}')
    if self.width < 1:
      raise ValueError(f'ResNet width must be >= 1, got {self.width}')
    if self.norm not in NORM_KINDS:
      raise ValueError(f'ResNet norm {self.norm!r} is not one of {NORM_KINDS}')
    return RESNET_STAGES[self.depth]

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> dict[str, Array]:
    check_images(images, f'ResNet-{self.depth}')
    block, stage_sizes = self._stages()
    norm = make_norm(
      self.norm,
      train=train,
      axis_name=self.axis_name,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = images.astype(self.dtype)
    x = conv(self.width, 7, stride=2, name='stem_conv', **kw)(x)
    x = nn.relu(norm(name='stem_norm')(x))
    features = {'stem': x} if self.stem_skip else {}
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    for stage, num_blocks in enumerate(stage_sizes):
      planes = self.width * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        layer = block(
          planes=planes,
          stride=stride,
          norm=norm,
          zero_init_residual=self.zero_init_residual,
          name=f'stage{stage + 1}_block{index}',
          **kw,
        )
        x = recomputed(layer, x) if self.remat else layer(x)
      features[C_LEVELS[stage]] = x

    if self.num_classes is not None:
      pooled = x.astype(jnp.float32).mean(axis=(1, 2))
      features['logits'] = nn.Dense(
        self.num_classes, param_dtype=self.param_dtype, name='classifier'
      )(pooled)
    return features
