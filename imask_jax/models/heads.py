"""The heads of Mask R-CNN and iMaskRCNN: RPN, box head and the two mask heads.

Heads are plain Flax modules on feature tensors; the ROIAlign that feeds the box and mask heads
is done by the model (`mask_rcnn.py`), except the iMaskRCNN's second ROIAlign, which belongs to
its mask head (the paper's Figure 2b) and therefore receives the pyramid and the ROIs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imask_jax.models import layers
from imask_jax.models.spec import IMaskSpec
from imask_jax.ops import roi_align as roi_align_ops

Array = jax.Array
Dtype = Any

HE_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
SMALL_NORMAL = nn.initializers.normal(0.01)
BOX_NORMAL = nn.initializers.normal(0.001)


class RPNHead(nn.Module):
  """Shared 3x3 conv + ReLU, then per-anchor objectness logits and box deltas on every level.

  Call: `{level: [B, H_l, W_l, D]}` -> (objectness `[B, sum_l H_l W_l A]`, deltas
  `[B, sum_l H_l W_l A, 4]`), levels concatenated in the order of `levels`, each flattened in
  (y, x, anchor) order to match `ops.anchors`. Outputs are float32.
  """

  num_anchors: int
  levels: tuple[str, ...] = ('P2', 'P3', 'P4', 'P5', 'P6')
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, Array]) -> tuple[Array, Array]:
    dim = features[self.levels[0]].shape[-1]
    shared = layers.Conv(
      dim, (3, 3), padding='SAME', kernel_init=SMALL_NORMAL, dtype=self.dtype, name='conv'
    )
    cls = layers.Conv(
      self.num_anchors, (1, 1), kernel_init=SMALL_NORMAL, dtype=self.dtype, name='objectness'
    )
    box = layers.Conv(
      4 * self.num_anchors, (1, 1), kernel_init=SMALL_NORMAL, dtype=self.dtype, name='deltas'
    )
    logits, deltas = [], []
    for level in self.levels:
      x = nn.relu(shared(features[level]))
      b = x.shape[0]
      logits.append(cls(x).reshape(b, -1))
      deltas.append(box(x).reshape(b, -1, 4))
    return (
      jnp.concatenate(logits, axis=1).astype(jnp.float32),
      jnp.concatenate(deltas, axis=1).astype(jnp.float32),
    )


class BoxHead(nn.Module):
  """Box head on 7x7 ROI features: 2 fc (or 4 conv + 1 fc), softmax classes, per-class deltas.

  Call: `[N, 7, 7, C]` -> (class logits `[N, K + 1]` with 0 = background, deltas `[N, K, 4]`),
  both float32.
  """

  num_classes: int
  kind: str = 'fc'
  dim: int = 1024
  conv_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    if self.kind not in ('fc', 'conv'):
      raise ValueError(f"model.box_head must be 'fc' or 'conv', got {self.kind!r}")
    x = x.astype(self.dtype)
    if self.kind == 'conv':
      for i in range(4):
        x = nn.relu(
          layers.Conv(
            self.conv_dim,
            (3, 3),
            padding='SAME',
            kernel_init=HE_FAN_OUT,
            dtype=self.dtype,
            name=f'conv{i + 1}',
          )(x)
        )
      x = nn.relu(nn.Dense(self.dim, dtype=self.dtype, name='fc1')(x.reshape(x.shape[0], -1)))
    else:
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(self.dim, dtype=self.dtype, name='fc1')(x))
      x = nn.relu(nn.Dense(self.dim, dtype=self.dtype, name='fc2')(x))
    logits = nn.Dense(self.num_classes + 1, kernel_init=SMALL_NORMAL, dtype=self.dtype, name='cls')(
      x
    )
    deltas = nn.Dense(
      4 * self.num_classes, kernel_init=BOX_NORMAL, dtype=self.dtype, name='deltas'
    )(x)
    return (
      logits.astype(jnp.float32),
      deltas.reshape(x.shape[0], self.num_classes, 4).astype(jnp.float32),
    )


class MaskTrunk(nn.Module):
  """Four 3x3 conv + ReLU on the 14x14 ROI features, then a 2x transposed conv + ReLU (-> 28)."""

  dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    for i in range(4):
      x = nn.relu(
        layers.Conv(
          self.dim,
          (3, 3),
          padding='SAME',
          kernel_init=HE_FAN_OUT,
          dtype=self.dtype,
          name=f'conv{i + 1}',
        )(x)
      )
    x = layers.UpConv2x2(self.dim, kernel_init=HE_FAN_OUT, dtype=self.dtype, name='upsample')(x)
    return nn.relu(x)


class StandardMaskHead(nn.Module):
  """Mask R-CNN's mask head: trunk on 14x14 features, per-class 28x28 mask logits.

  Call: (roi features `[N, 14, 14, C]`, pyramid, rois `[N, 4]`, batch index `[N]`) ->
  `[N, 28, 28, K]` float32 logits. The pyramid and ROIs are unused (same call as `IMaskHead`).
  """

  num_classes: int
  dim: int = 256
  dtype: Dtype = jnp.float32

  output_size: int = 28

  @nn.compact
  def __call__(
    self, roi_features: Array, pyramid: Mapping[str, Array], rois: Array, batch_index: Array
  ) -> Array:
    del pyramid, rois, batch_index
    x = MaskTrunk(self.dim, self.dtype, name='trunk')(roi_features)
    logits = layers.Conv(
      self.num_classes, (1, 1), kernel_init=HE_FAN_OUT, dtype=self.dtype, name='logits'
    )(x)
    return logits.astype(jnp.float32)


class IMaskHead(nn.Module):
  """The paper's iMaskRCNN mask head (section 2.2, Figure 2b).

  The standard trunk gives 28x28 features. A decoder (learnable stride-2 transposed convs, as
  many as needed) lifts them to the output size S; a second ROIAlign reads the same ROIs at
  S x S from a high-resolution pyramid level; the two are concatenated through a skip
  connection and fused by a 3x3 conv before the per-class 1x1 logits.

  The paper does not give channel widths. Everything at S x S runs at `fine_dim` channels
  (32 by default, an eighth of the trunk's): a 3x3 conv at 56x56 costs 16x one at 14x14 for
  the same widths, so a full-width fine path would cost several times the standard head. At
  an eighth, with a 1x1 reduction before the transposed conv, it adds about 15% of the
  standard head's multiply-adds.

  Ablation switches: `decoder=False` replaces the transposed conv by bilinear upsampling;
  `skip=False` drops the second ROIAlign (the fusion conv stays, so the comparison isolates
  the skip features). S = `skip_size` (28, 56 or 112) with the skip, 56 without it.

  Layers the paper does not name, each switchable: `reduce` (the 1x1 conv + ReLU taking the
  trunk's D channels to `fine_dim` before the decoder; off: the decoder reads the D channels),
  `skip_projection` (the 1x1 conv to `fine_dim` on the skip's pyramid level and the ReLU after
  its ROIAlign; off: the skip is the ROIAligned level itself, at the pyramid's width) and
  `fuse_convs` (0: the logits read the concatenation directly). With all three off and
  `fine_dim` = D the head is the paper's text and nothing more: trunk, one transposed conv,
  the 56x56 ROIAlign concatenated, 1x1 logits.

  Call: (roi features `[N, 14, 14, C]`, pyramid `{level: [B, H, W, C]}`, rois `[N, 4]` in input
  pixels, batch index `[N]`) -> `[N, S, S, K]` float32 logits.
  """

  num_classes: int
  dim: int = 256
  decoder: bool = True
  skip: bool = True
  skip_size: int = 56
  skip_level: str = 'P2'
  fine_dim: int = 32
  fuse_convs: int = 1
  skip_sampling_ratio: int = 1
  reduce: bool = True
  skip_projection: bool = True
  dtype: Dtype = jnp.float32

  @property
  def output_size(self) -> int:
    return self.skip_size if self.skip else 56

  def _conv(self, features: int, kernel: int, name: str) -> nn.Conv:
    return layers.Conv(
      features,
      (kernel, kernel),
      padding='SAME',
      kernel_init=HE_FAN_OUT,
      dtype=self.dtype,
      name=name,
    )

  @nn.compact
  def __call__(
    self, roi_features: Array, pyramid: Mapping[str, Array], rois: Array, batch_index: Array
  ) -> Array:
    size = self.output_size
    if size not in (28, 56, 112):
      raise ValueError(f'model.imask.skip_size must be 28, 56 or 112, got {size}')
    if self.skip and self.skip_sampling_ratio < 1:
      raise ValueError(
        f'IMaskHead: skip_sampling_ratio={self.skip_sampling_ratio}; expected >= 1 '
        '(0, adaptive, is resolved by ModelSpec from the input size)'
      )
    x = MaskTrunk(self.dim, self.dtype, name='trunk')(roi_features)  # [N, 28, 28, D]
    if self.reduce:
      x = nn.relu(self._conv(self.fine_dim, 1, 'reduce')(x))  # [N, 28, 28, F]
    if self.decoder:
      # The learnable decoder: stride-2 transposed convs up to S (a 3x3 conv when S = 28).
      for i in range(int(math.log2(size // 28))):
        x = nn.relu(
          layers.UpConv2x2(
            self.fine_dim, kernel_init=HE_FAN_OUT, dtype=self.dtype, name=f'decoder{i + 1}'
          )(x)
        )
      if size == 28:
        x = nn.relu(self._conv(self.fine_dim, 3, 'decoder1')(x))
    elif size != 28:
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), 'bilinear')
    if self.skip:
      # The 1x1 projection to fine_dim is applied to the pyramid level before the ROIAlign
      # (both are linear, so the order only changes the cost): the 56x56 crops are then read
      # at fine_dim channels instead of the full pyramid width. skip_sampling_ratio samples
      # per bin axis (adaptive_sampling_ratio: 1 where bins are smaller than a map pixel).
      level = int(self.skip_level.lstrip('P'))
      source = pyramid[self.skip_level]
      if self.skip_projection:
        source = self._conv(self.fine_dim, 1, 'skip_proj')(source)
      skip = roi_align_ops.multilevel_roi_align(
        {self.skip_level: source},
        jax.lax.stop_gradient(rois),
        size,
        sampling_ratio=self.skip_sampling_ratio,
        level=level,
        batch_index=batch_index,
      )
      skip = skip.astype(self.dtype)
      if self.skip_projection:
        skip = nn.relu(skip)
      x = jnp.concatenate([x, skip], axis=-1)
    for i in range(self.fuse_convs):
      x = nn.relu(self._conv(self.fine_dim, 3, f'fuse{i + 1}')(x))
    logits = self._conv(self.num_classes, 1, 'logits')(x)
    return logits.astype(jnp.float32)


# --- choosing a mask head by name ---------------------------------------------------------------


# config `model.mask_head` -> constructor(num_classes, dim, imask spec, dtype, **module kwargs).
# The model, the config checks and the sweeps all read this one table: a new head is one entry.
MaskHeadFactory = Callable[..., nn.Module]
MASK_HEADS: dict[str, MaskHeadFactory] = {
  'standard': lambda num_classes, dim, imask, dtype, **kw: StandardMaskHead(
    num_classes=num_classes, dim=dim, dtype=dtype, **kw
  ),
  'imask': lambda num_classes, dim, imask, dtype, **kw: IMaskHead(
    num_classes=num_classes, dim=dim, dtype=dtype, **dataclasses.asdict(imask), **kw
  ),
}


def build_mask_head(
  name: str,
  *,
  num_classes: int,
  dim: int,
  imask: IMaskSpec,
  dtype: Dtype = jnp.float32,
  **module_kwargs: Any,
) -> nn.Module:
  """The mask head called `name` in MASK_HEADS; its `output_size` is the side of the masks it
  predicts. module_kwargs go to the Flax module (e.g. parent=None for a free-standing one)."""
  if name not in MASK_HEADS:
    raise ValueError(f'model.mask_head={name!r}; expected one of {sorted(MASK_HEADS)}')
  return MASK_HEADS[name](num_classes, dim, imask, dtype, **module_kwargs)
