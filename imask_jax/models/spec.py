"""What fixes a Mask R-CNN / iMaskRCNN network and its static shapes: `ModelSpec`, with the
iMask head's switches (`IMaskSpec`) and the point head's settings (`PointSpec`).

This is the one home of every model default: `configs.default_config()` builds `config.model`
from these fields (`config_defaults`) and `ModelSpec.from_config` reads it back, each field by
its own name. The checks of single `config.model` fields that the spec's own construction
cannot make live here too (`model_kind`, `paint_slots_per_class`, `mask_threshold`). No JAX
at import time (the commands' --help and the config checks stay light); the few properties that
need the network's modules import them when asked.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import ml_collections

# Fields a config does not hold: they follow from config.data (input shape, the number of
# classes: one per data.class_names) or from how the model is run (the data-parallel axis of
# batch norm).
FROM_DATA = ('image_size', 'input_channels', 'num_classes', 'axis_name')


@dataclasses.dataclass(frozen=True)
class IMaskSpec:
  """The iMask head's switches (config `model.imask`), named as `heads.IMaskHead`'s fields."""

  decoder: bool = True  # learnable transposed conv 28 -> 56
  skip: bool = True  # second ROIAlign concatenated through the skip connection
  skip_size: int = 56  # 28, 56 or 112
  skip_level: str = 'P2'  # the pyramid level the skip ROIAlign reads
  fine_dim: int = 32  # channels of the 56x56 part (decoder, skip, fusion)
  fuse_convs: int = 1  # 3x3 convs after the skip concatenation
  # Bilinear samples per bin axis of the skip ROIAlign; 0 = adaptive (`adaptive_sampling_ratio`:
  # 1 at 128 px, 3 at the paper's 1024 px), resolved by the model, which knows the input size.
  skip_sampling_ratio: int = 0
  # Layers the paper does not name (heads.IMaskHead): the 1x1 conv + ReLU to fine_dim before
  # the decoder, and the 1x1 conv on the skip's level + ReLU after its ROIAlign.
  reduce: bool = True
  skip_projection: bool = True


def adaptive_sampling_ratio(image_size: tuple[int, int], skip_level: str, skip_size: int) -> int:
  """Samples per bin axis of the skip ROIAlign such that a box half the input wide (a femur on
  a knee slice) still gets a sample for every pixel of the level it reads, so the S x S crop
  does not alias: ceil(max(H, W) / 2 / stride / S), at least 1. 1 on 128-pixel inputs at P2
  and S = 56 (bins smaller than a map pixel); 3 on the paper's 1024-pixel inputs, where a
  600-pixel femur box is 150 P2 pixels, 2.7 per 56-bin cell."""
  stride = 2 ** int(skip_level.lstrip('P'))
  return max(1, math.ceil(max(image_size) / 2 / stride / skip_size))


@dataclasses.dataclass(frozen=True)
class PointSpec:
  """The point head's settings (config `model.point_head`): PointRend-style boundary
  refinement, the mask predicted again at the coarse grid's most uncertain points from
  features read there (models/point_head.py)."""

  enabled: bool = False
  level: str = 'P2'  # pyramid level read at each point
  image_patch: int = 3  # side of the input-image patch read around each point (0: none)
  dim: int = 64  # MLP width
  num_fc: int = 3
  train_points: int = 196  # points per mask ROI in training (14 x 14 in the paper)
  oversample: float = 3.0  # importance sampling: candidates per point ...
  importance: float = 0.75  # ... and the share of points taken from the most uncertain
  subdivision_steps: int = 1  # inference: 2x refinements of the mask grid (56 -> 112)
  subdivision_points: int = 784  # inference: cells predicted again per refinement (28 x 28)
  loss_weight: float = 1.0

  def __post_init__(self):
    problems = []
    if self.level not in ('P2', 'P3', 'P4', 'P5'):
      problems.append(f"level={self.level!r} (expected 'P2'..'P5')")
    for name in ('dim', 'num_fc', 'train_points', 'subdivision_points'):
      if getattr(self, name) < 1:
        problems.append(f'{name}={getattr(self, name)} (expected >= 1)')
    for name in ('image_patch', 'subdivision_steps'):
      if getattr(self, name) < 0:
        problems.append(f'{name}={getattr(self, name)} (expected >= 0)')
    if self.oversample < 1:
      problems.append(f'oversample={self.oversample} (expected >= 1)')
    if not 0 <= self.importance <= 1:
      problems.append(f'importance={self.importance} (expected a share in [0, 1])')
    if problems:
      raise ValueError('config model.point_head: ' + '; '.join(problems))

  def output_size(self, coarse_size: int) -> int:
    """Side of the refined masks for a mask head of side `coarse_size`."""
    return coarse_size * 2**self.subdivision_steps if self.enabled else coarse_size


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that fixes the network and its static shapes (hashable, so jit can key on it).
  Fields without a default come from the data (`FROM_DATA`)."""

  image_size: tuple[int, int]
  num_classes: int  # foreground classes
  input_channels: int = 1
  backbone: str = 'resnet50'  # resnet18/50/101, densenet121/169
  norm: str = 'group'  # batch, frozen_batch, group
  width: int = 64  # backbone base width (64 = the published networks)
  fpn_dim: int = 256
  # Recompute the backbone body's activations block by block in the backward pass: less
  # memory for one more forward through the body (the same values and parameters).
  remat: bool = False
  dtype: str = 'float32'  # compute dtype: float32 or bfloat16 (params stay float32)
  axis_name: str | None = None
  anchor_sizes: tuple[float, ...] = (16, 32, 64, 128, 256)  # one per level P2-P6, input pixels
  # height / width; thin cartilage bands need the extremes
  anchor_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
  rpn_pre_nms_topk_train: int = 1000  # per level
  rpn_post_nms_topk_train: int = 512
  rpn_pre_nms_topk_test: int = 500
  rpn_post_nms_topk_test: int = 256
  rpn_nms_threshold: float = 0.7
  rpn_batch_size: int = 256
  rpn_positive_fraction: float = 0.5
  roi_batch_size: int = 128
  roi_positive_fraction: float = 0.25
  # Share of the box head's negative ROIs taken as the negative proposals of highest RPN
  # objectness (bright look-alikes: bladder, bowel, oedema) instead of drawn at random.
  roi_hard_negative_fraction: float = 0.0
  mask_rois_per_image: int = 32  # cap on mask-head ROIs (the first, positive, slots)
  roi_iou_threshold: float = 0.5
  roi_level_k0: int = 4
  roi_level_canonical: float = 64.0  # MRI inputs are smaller than COCO's (224 there)
  roi_sampling_ratio: int = 2
  box_head: str = 'fc'  # fc (2 x 1024 fc) or conv (4 conv + 1 fc)
  box_head_dim: int = 1024
  mask_head: str = 'imask'  # standard or imask
  mask_head_dim: int = 256
  imask: IMaskSpec = IMaskSpec()
  # PointRend-style boundary refinement on top of the mask head (off: the paper's models).
  point_head: PointSpec = PointSpec()
  boundary_loss_weight: float = 0.0  # optional boundary-weighted mask BCE (0 = off)
  mask_dice_weight: float = 0.0  # optional soft-Dice term added to the mask BCE (0 = off)
  test_score_threshold: float = 0.05  # detections kept (mask AP counts them all)
  test_nms_threshold: float = 0.5
  max_detections: int = 16
  # Detections painted into label maps (Dice, surfaces, predict's NIfTIs): 0.5 rather than
  # 0.05 keeps unsure duplicates and look-alikes (patellar cartilage) out of the segmentation.
  label_score_threshold: float = 0.5
  # A pasted pixel belongs to a painted detection where its mask probability is >= this (Mask
  # R-CNN's 0.5); an experiment may choose another on its validation split.
  mask_threshold: float = 0.5
  # Pixels painted into label maps, 'union' or 'each' (detections.detections_to_label_map).
  paint_rule: str = 'union'
  # predict: the mask head runs only on each class's best `paint_slots_per_class` detections
  # scoring >= label_score_threshold (the ones that paint), not on all max_detections; a scan
  # where more would have painted is flagged in its report. 0 = all (evaluate always runs all:
  # mask AP ranks every detection).
  paint_slots_per_class: int = 0

  @classmethod
  def from_config(cls, config: Any, *, axis_name: str | None = None) -> ModelSpec:
    """The spec of a full experiment config: every field is read by its own name from
    `config.model` (`imask` from the `model.imask` group), converted to the field's type;
    the input shape and the number of classes (data.class_names) come from `config.data`."""
    d = config.data
    fixed = dict(
      image_size=tuple(int(v) for v in d.image_size),
      input_channels=2 * int(d.context_slices) + 1,
      num_classes=len(d.class_names),
      axis_name=axis_name,
    )
    return cls(**fixed, **_fields_from(cls, config.model, 'model', exclude=fixed))

  @property
  def compute_dtype(self) -> Any:
    import jax.numpy as jnp

    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    return jnp.bfloat16 if self.dtype == 'bfloat16' else jnp.float32

  @property
  def mask_size(self) -> int:
    """Resolution of the mask head's output (and of its targets); with the point head the
    detections' masks come back finer (`detection_mask_size`)."""
    # A free-standing (parentless) head: the spec may be asked inside the model's methods.
    return self.build_mask_head(parent=None).output_size

  @property
  def detection_mask_size(self) -> int:
    """Side of `Detections.mask_probs`: the mask head's, refined by the point head's
    subdivision steps when it is on."""
    return self.point_head.output_size(self.mask_size)

  @property
  def resolved_imask(self) -> IMaskSpec:
    """`imask` with an adaptive (0) skip sampling ratio turned into samples per bin axis."""
    if self.imask.skip_sampling_ratio:
      return self.imask
    return dataclasses.replace(
      self.imask,
      skip_sampling_ratio=adaptive_sampling_ratio(
        self.image_size, self.imask.skip_level, self.imask.skip_size
      ),
    )

  def at_size(self, image_size: tuple[int, int]) -> ModelSpec:
    """The same network for inputs of another (H, W): the parameters do not depend on the
    input size; anchors and box clipping follow it. The skip ROIAlign's adaptive sampling
    ratio stays that of this spec's size, so a whole-slice canvas larger than the training
    crop samples each ROI as training did (structures have the same size in pixels)."""
    image_size = tuple(int(n) for n in image_size)
    if image_size == self.image_size:
      return self
    return dataclasses.replace(self, image_size=image_size, imask=self.resolved_imask)

  def build_mask_head(self, **module_kwargs: Any) -> Any:
    from imask_jax.models import heads

    return heads.build_mask_head(
      self.mask_head,
      num_classes=self.num_classes,
      dim=self.mask_head_dim,
      imask=self.resolved_imask,
      dtype=self.compute_dtype,
      **module_kwargs,
    )

  @property
  def num_mask_rois(self) -> int:
    """Mask-head ROIs per image in training: the first slots of the ROI sample, which hold
    its positives (in random order), capped at `mask_rois_per_image`. The mask head's cost
    grows with this static count whether or not the slots hold positives, and a slice of
    MRI has a handful of objects, so a random subset of 32 positives loses little."""
    from imask_jax.ops import sampling

    positives = sampling.num_positives_wanted(self.roi_batch_size, self.roi_positive_fraction)
    return min(positives, self.mask_rois_per_image)


# --- checks of single config.model fields ------------------------------------------------------
# Read from the config as written, before any type conversion (ModelSpec.from_config would turn
# 2.5 painting slots into 2 and True into 1), and for either model.kind: the U-Net, which builds
# no ModelSpec, paints with model.mask_threshold too. configs.check_train_config calls all three
# before training; loading a workdir (inference/loading.py), evaluate and sweep call those they
# read.

MODEL_KINDS = ('maskrcnn', 'unet')


def model_kind(config: ml_collections.ConfigDict) -> str:
  """config model.kind, refused unless one of MODEL_KINDS (and a U-Net with model.init_from
  only when its encoder is a backbone: converted weights fill backbone/body)."""
  kind = str(config.model.get('kind', 'maskrcnn'))
  if kind not in MODEL_KINDS:
    raise ValueError(f'config model.kind={kind!r}; expected one of {MODEL_KINDS}')
  if kind == 'unet' and str(config.model.init_from or '') and config.model.unet.encoder == 'plain':
    raise ValueError(
      f'config model.init_from={config.model.init_from!r} is set but the U-Net has the plain '
      'encoder, which no converted file fits; set model.unet.encoder to the backbone the file '
      'holds (e.g. resnet50) or drop model.init_from'
    )
  return kind


def paint_slots_per_class(config: ml_collections.ConfigDict) -> int:
  """config model.paint_slots_per_class, refused unless 0 <= value <= model.max_detections."""
  value, most = config.model.paint_slots_per_class, int(config.model.max_detections)
  if isinstance(value, bool) or int(value) != value or not 0 <= int(value) <= most:
    raise ValueError(
      f'config model.paint_slots_per_class={value!r}; expected an integer from 0 (all '
      f'detections) to model.max_detections={most}'
    )
  return int(value)


def mask_threshold(config: ml_collections.ConfigDict) -> float:
  """config model.mask_threshold, refused unless 0 < value <= 1 (a probability; at 0 every
  pixel of every box would be painted)."""
  value = config.model.mask_threshold
  if isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
    raise ValueError(f'config model.mask_threshold={value!r}; expected a probability in (0, 1]')
  return float(value)


def config_defaults() -> ml_collections.ConfigDict:
  """`config.model`'s network fields at ModelSpec's defaults (nested groups for `imask` and
  `point_head`), without the fields that come from the data (`FROM_DATA`)."""
  return ml_collections.ConfigDict(_defaults(ModelSpec, exclude=FROM_DATA))


def _defaults(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    value = field.default
    out[field.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
  return out


def _fields_from(cls: type, section: Any, where: str, exclude: Any = ()) -> dict[str, Any]:
  """The fields of dataclass `cls`, each read from `section[name]` (a config group) and converted
  to the field's annotated type: a nested dataclass from a nested group, a tuple element by
  element. `where` names the group in errors."""
  hints = typing.get_type_hints(cls)
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in exclude:
      continue
    if field.name not in section:
      raise ValueError(f'config {where}.{field.name} is missing')
    out[field.name] = _as_type(hints[field.name], section[field.name], f'{where}.{field.name}')
  return out


def _as_type(hint: Any, value: Any, where: str) -> Any:
  if dataclasses.is_dataclass(hint):
    return hint(**_fields_from(hint, value, where))
  if typing.get_origin(hint) is tuple:
    element = typing.get_args(hint)[0]
    return tuple(element(v) for v in value)
  if hint is bool and not isinstance(value, (bool, int)):
    raise ValueError(f'config {where}={value!r}; expected True or False')
  return hint(value)
