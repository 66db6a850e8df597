"""A 2D semantic U-Net: the baseline the field uses, beside Mask R-CNN (`model.kind = 'unet'`).

An encoder of `depth` resolution levels and a decoder back up, joined by skip connections;
every pixel gets K + 1 class logits (0 = background). Fully convolutional: any input size works
(padded inside to a multiple of 2^(depth - 1), the output cropped back). `UNetSpec` fixes the
net, `UNet` is the module, `init_variables` its variables; the encoder (`model.unet.encoder`) is
'plain' or a ResNet / DenseNet body (then `depth` must be 6). Most choices are nnU-Net's 2D ones.
Shapes: images float [B, H, W, C] -> logits float32 [B, H, W, K + 1] (and, with deep
supervision, [B, ceil(H / 2^i), ceil(W / 2^i), K + 1] for i = 1 .. depth - 2).

nnU-Net's choices taken and not taken, the backbone encoders and their pretrained weights:
docs/architecture.md, 'The U-Net baseline'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models import layers, semantic_losses
from imask_jax.models.backbones import BACKBONE_NAMES
from imask_jax.models.densenet import DenseNet
from imask_jax.models.norm import make_norm
from imask_jax.models.resnet import ResNet, check_images

Array = jax.Array

NEGATIVE_SLOPE = 0.01
# He-normal for LeakyReLU(a): gain 2 / (1 + a^2), fan-in (PyTorch's kaiming_normal_ default).
HE_LEAKY = nn.initializers.variance_scaling(2.0 / (1.0 + NEGATIVE_SLOPE**2), 'fan_in', 'normal')
UNET_NORMS = ('group', 'batch')
ENCODERS = ('plain',) + BACKBONE_NAMES
ENCODER_DEPTH = 6  # full resolution, the stem (stride 2) and C2-C5 (strides 4-32)


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Everything that fixes the U-Net (hashable, so jit can key on it).

  image_size: (H, W) of the training input (initialisation only: the net takes any size).
  depth: resolution levels, the bottleneck included (depth - 1 downsamplings).
  width: channels of the first level; level i has min(width * 2^i, max_width).
  norm: 'group' (group or instance norm, see norm_groups) or 'batch' (model.norm).
  norm_groups: groups of group norm; 0 = instance norm (a group per channel).
  deep_supervision: extra 1x1 heads at the coarser decoder levels in the loss.
  encoder: 'plain' or a backbone name (docs/architecture.md, 'The U-Net baseline');
  encoder_width: its base width (model.width).
  sliding_window: run inputs larger than image_size in windows of image_size
    (inference/sliding_window.py), overlapping by window_overlap, weighted by a Gaussian
    importance map (window_gaussian) or uniformly.
  """

  image_size: tuple[int, int]
  num_classes: int
  input_channels: int = 1
  depth: int = 5
  width: int = 32
  max_width: int = 512
  norm: str = 'group'
  norm_groups: int = 0
  deep_supervision: bool = True
  dice_weight: float = 1.0
  ce_weight: float = 1.0
  encoder: str = 'plain'
  encoder_width: int = 64
  sliding_window: bool = False
  window_overlap: float = 0.5
  window_gaussian: bool = True
  dtype: str = 'float32'
  axis_name: str | None = None

  def __post_init__(self):
    if self.depth < 1:
      raise ValueError(f'config model.unet.depth={self.depth}; expected an integer >= 1')
    if self.width < 1 or self.max_width < self.width:
      raise ValueError(
        f'config model.unet.width={self.width}, max_width={self.max_width}; expected '
        '1 <= width <= max_width'
      )
    if self.norm not in UNET_NORMS:
      raise ValueError(f'config model.norm={self.norm!r}; the U-Net takes one of {UNET_NORMS}')
    if self.norm_groups < 0:
      raise ValueError(f'config model.unet.norm_groups={self.norm_groups}; expected >= 0')
    if self.encoder not in ENCODERS:
      raise ValueError(f'config model.unet.encoder={self.encoder!r}; expected one of {ENCODERS}')
    if self.encoder != 'plain' and self.depth != ENCODER_DEPTH:
      raise ValueError(
        f'config model.unet.depth={self.depth} with model.unet.encoder={self.encoder!r}: a '
        f'backbone encoder has {ENCODER_DEPTH} levels (strides 1 to 32); set '
        f'model.unet.depth={ENCODER_DEPTH}'
      )
    if self.encoder_width < 1:
      raise ValueError(f'config model.width={self.encoder_width}; expected >= 1')
    if not 0.0 <= self.window_overlap < 1.0:
      raise ValueError(
        f'config model.unet.window_overlap={self.window_overlap}; expected 0 <= overlap < 1'
      )
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"config model.dtype={self.dtype!r}; expected 'float32' or 'bfloat16'")

  @classmethod
  def from_config(cls, config: Any, *, axis_name: str | None = None) -> UNetSpec:
    """The spec of a full experiment config: `config.model.unet`, model.norm and dtype; the
    input shape and the number of classes (data.class_names) from `config.data`."""
    d, m = config.data, config.model
    u = m.unet
    return cls(
      image_size=tuple(int(v) for v in d.image_size),
      num_classes=len(d.class_names),
      input_channels=2 * int(d.context_slices) + 1,
      depth=int(u.depth),
      width=int(u.width),
      max_width=int(u.max_width),
      norm=str(m.norm),
      norm_groups=int(u.norm_groups),
      deep_supervision=bool(u.deep_supervision),
      dice_weight=float(u.dice_weight),
      ce_weight=float(u.ce_weight),
      encoder=str(u.encoder),
      encoder_width=int(m.width),
      sliding_window=bool(u.sliding_window),
      window_overlap=float(u.window_overlap),
      window_gaussian=bool(u.window_gaussian),
      dtype=str(m.dtype),
      axis_name=axis_name,
    )

  @property
  def compute_dtype(self) -> Any:
    return jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32

  @property
  def size_multiple(self) -> int:
    """Inputs are padded inside the net to a multiple of this (2^(depth - 1))."""
    return 2 ** (self.depth - 1)

  def widths(self) -> tuple[int, ...]:
    return tuple(min(self.width * 2**i, self.max_width) for i in range(self.depth))

  def at_size(self, image_size: tuple[int, int]) -> UNetSpec:
    """The same network for inputs of another (H, W) (the parameters do not depend on it)."""
    return dataclasses.replace(self, image_size=tuple(int(n) for n in image_size))


class ConvBlock(nn.Module):
  """Two (3x3 conv -> norm -> LeakyReLU) layers; the first with `stride`.
  [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]."""

  features: int
  stride: int
  spec: UNetSpec
  train: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    groups = s.norm_groups or self.features  # instance norm: a group per channel
    norm = make_norm(s.norm, train=self.train, axis_name=s.axis_name, num_groups=groups)
    for i, stride in enumerate((self.stride, 1)):
      x = layers.Conv(
        self.features,
        (3, 3),
        strides=(stride, stride),
        padding=((1, 1), (1, 1)),
        use_bias=False,  # a norm follows
        kernel_init=HE_LEAKY,
        dtype=s.compute_dtype,
        name=f'conv{i}',
      )(x)
      x = norm(name=f'norm{i}')(x)
      x = nn.leaky_relu(x, NEGATIVE_SLOPE)
    return x


class Encoder(nn.Module):
  """A backbone body as the U-Net's encoder, named so that its variables sit at backbone/body/
  as Mask R-CNN's do. [B, H, W, C] (H, W multiples of 32) -> [stem (H / 2), C2 (H / 4), ...,
  C5 (H / 32)]."""

  spec: UNetSpec
  train: bool

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    s = self.spec
    common = dict(
      norm=s.norm, axis_name=s.axis_name, dtype=s.compute_dtype, stem_skip=True, name='body'
    )
    depth = int(s.encoder.removeprefix('resnet').removeprefix('densenet'))
    if s.encoder.startswith('resnet'):
      body = ResNet(depth=depth, width=s.encoder_width, **common)
    else:
      growth = max(s.encoder_width // 2, 1)  # backbones.build_backbone's rule
      body = DenseNet(depth=depth, growth_rate=growth, num_init_features=s.encoder_width, **common)
    levels = body(x, train=self.train)
    return [levels[name] for name in ('stem', 'C2', 'C3', 'C4', 'C5')]


class UNet(nn.Module):
  """The U-Net of `spec`. Call: (images [B, H, W, C], train) -> list of logits float32, the
  full-resolution [B, H, W, K + 1] first, then (deep supervision, train only) the coarser
  decoder levels' [B, ceil(H / 2^i), ceil(W / 2^i), K + 1], i = 1 .. depth - 2."""

  spec: UNetSpec

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> list[Array]:
    check_images(images, 'UNet')
    s = self.spec
    _, height, width, _ = images.shape
    multiple = s.size_multiple
    pad_h, pad_w = -height % multiple, -width % multiple
    x = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))).astype(s.compute_dtype)
    widths = s.widths()
    skips = []
    if s.encoder == 'plain':
      for level, features in enumerate(widths):
        x = ConvBlock(features, 1 if level == 0 else 2, s, train, name=f'down{level}')(x)
        skips.append(x)
    else:
      skips.append(ConvBlock(widths[0], 1, s, train, name='down0')(x))
      skips += Encoder(s, train, name='backbone')(x)
      x = skips[-1]
    outputs = []
    for level in range(s.depth - 2, -1, -1):
      x = layers.UpConv2x2(
        widths[level], kernel_init=HE_LEAKY, dtype=s.compute_dtype, name=f'upconv{level}'
      )(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock(widths[level], 1, s, train, name=f'up{level}')(x)
      # The coarsest decoder level's head would carry weight 0 (deep_supervision_weights).
      if level == 0 or (train and s.deep_supervision and level < s.depth - 2):
        logits = layers.Conv(s.num_classes + 1, (1, 1), dtype=s.compute_dtype, name=f'head{level}')(
          x
        )
        f = 2**level
        outputs.append(logits[:, : math.ceil(height / f), : math.ceil(width / f)])
    if s.depth == 1:  # no decoder: the head reads the one level
      logits = layers.Conv(s.num_classes + 1, (1, 1), dtype=s.compute_dtype, name='head0')(x)
      outputs.append(logits[:, :height, :width])
    # Full resolution first.
    return [o.astype(jnp.float32) for o in reversed(outputs)]

  def losses(
    self, images: Array, targets: dict[str, Array], keys: Array, train: bool = True
  ) -> tuple[Array, dict[str, Array]]:
    """Training loss for a batch, with `MaskRCNN.losses`'s signature (steps.make_train_step).

    images float [B, H, W, C]; targets: the padded instances gt_classes [B, M], gt_masks
    [B, M, H, W], gt_valid [B, M] (gt_boxes unused), turned into a label map; keys: unused
    (no sampling). Returns (total, {'dice', 'ce' (full resolution), 'deep_supervision'}).
    """
    del keys
    labels = semantic_losses.label_map_from_instances(
      targets['gt_classes'], targets['gt_masks'], targets['gt_valid']
    )
    outputs = self(images, train)
    loss = _dice_ce(self.spec)
    total, terms = loss(outputs[0], labels)
    if len(outputs) > 1:
      weights = semantic_losses.deep_supervision_weights(len(outputs) + 1)
      deep = weights[0] * total
      for i, logits in enumerate(outputs[1:], start=1):
        deep = deep + weights[i] * loss(logits, semantic_losses.downsample_labels(labels, 2**i))[0]
      terms['deep_supervision'] = deep
      total = deep
    return total, terms

  def segment(self, images: Array) -> Array:
    """Class probabilities float32 [B, H, W, K + 1] of images [B, H, W, C] (inference)."""
    return jax.nn.softmax(self(images, False)[0], axis=-1)


def _dice_ce(spec: UNetSpec):
  """The spec's Dice + CE loss: (logits, labels) -> (total, terms)."""
  return lambda logits, labels: semantic_losses.dice_ce_loss(
    logits, labels, dice_weight=spec.dice_weight, ce_weight=spec.ce_weight
  )


def init_variables(model: UNet, key: Array) -> dict[str, Any]:
  """Initial variables (drawn with the 'rbg' generator from `key`, as
  `mask_rcnn.init_variables` draws them: faster to compile on CPU)."""
  key = jax.random.key(jax.random.bits(key, (), jnp.uint32), impl='rbg')
  s = model.spec
  images = jnp.zeros((1,) + s.image_size + (s.input_channels,), jnp.float32)
  return model.init(key, images, True)
