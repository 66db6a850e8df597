"""Per-example transforms of the input pipeline (TensorFlow graph code) and their settings.

`prepare_example` (shared by training, evaluation and `input_pipeline.volume_inputs`) turns a
stored example into a network-input one: per-volume percentile normalisation to [0, 1], at most
`data.max_instances` instances, resampled to `data.pixel_spacing_mm` (scale-true) or resized to
fit `data.image_size`, padded bottom/right with 0. Training then crops (`crop_example`) and
augments (`augment_example`, with contrast_augment.py); `finish_batch` recomputes tight boxes per
batch. Masks are per instance, channels-last [H, W, M] uint8 until `finish_batch` makes them
[B, M, H, W]. TensorFlow is kept off every GPU (JAX owns them). Randomness is stateless: each
transform draws from the seed it is given.

Each step, where a network-input pixel sits in the source slice and the order of the
augmentations: docs/data.md, 'Per-example transforms'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from data_pipelines import slice_examples
from imask_jax import contrast_augment


def _hide_gpus_from_tensorflow() -> None:
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow was initialised before this module was imported
    if tf.config.get_visible_devices('GPU'):
      raise RuntimeError(
        'TensorFlow already sees a GPU; import imask_jax.input_pipeline (or slice_transforms) '
        'before running any TensorFlow op, so that JAX keeps the GPUs'
      ) from None


_hide_gpus_from_tensorflow()


# --- settings ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """Training augmentation. Angles in degrees; scale > 1 enlarges; gamma applies x ** gamma to
  the [0, 1] image (drawn log-uniformly); noise_std in units of the normalised image;
  intensity_scale_range multiplies the normalised image by a factor drawn log-uniformly and
  clips it to [0, 1] again, as the percentile normalisation of another field of view or coil
  does (a field of view with less bright fluid in it moves the 99.5th percentile down)."""

  flip_lr: bool
  flip_ud: bool
  rotate_degrees: float
  scale_range: tuple[float, float]
  gamma_range: tuple[float, float]
  noise_std: float
  intensity_scale_range: tuple[float, float] = (1.0, 1.0)
  contrast: contrast_augment.ContrastSettings | None = None  # None: off

  def __post_init__(self):
    lo, hi = self.scale_range
    if not 0 < lo <= hi:
      raise ValueError(
        f'config data.augment.scale_range={self.scale_range}; expected 0 < low <= high'
      )
    for name in ('gamma_range', 'intensity_scale_range'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(
          f'config data.augment.{name}={getattr(self, name)}; expected 0 < low <= high'
        )
    if self.rotate_degrees < 0 or self.noise_std < 0:
      raise ValueError(
        f'config data.augment: rotate_degrees={self.rotate_degrees} and '
        f'noise_std={self.noise_std}; expected both >= 0'
      )


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """image_size: network input (H, W) (the training crop when scale-true); max_instances: M;
  percentile_indices: positions in `slice_examples.PERCENTILE_LEVELS` of the low and high
  normalisation percentiles; pixel_spacing_mm: the in-plane spacing slices are resampled to
  (None: resize to fit image_size); size_multiple: whole scale-true slices are padded up to a
  multiple of it; crop_foreground_rate: share of training crops placed over a labelled pixel."""

  image_size: tuple[int, int]
  max_instances: int
  percentile_indices: tuple[int, int]
  pixel_spacing_mm: float | None = None
  size_multiple: int = 64
  crop_foreground_rate: float = 0.5

  @property
  def scale_true(self) -> bool:
    return self.pixel_spacing_mm is not None


def prepare_settings(config: Any) -> PrepareSettings:
  d = config.data
  image_size = tuple(int(n) for n in d.image_size)
  if len(image_size) != 2 or min(image_size) < 1:
    raise ValueError(f'config data.image_size={tuple(d.image_size)}; expected (H, W) >= 1')
  if int(d.max_instances) < 1:
    raise ValueError(f'config data.max_instances={d.max_instances}; expected >= 1')
  levels = slice_examples.PERCENTILE_LEVELS
  lo, hi = (float(p) for p in d.normalize_percentiles)
  if lo not in levels or hi not in levels or not lo < hi:
    raise ValueError(
      f'config data.normalize_percentiles={tuple(d.normalize_percentiles)}; '
      f'expected two increasing levels among the stored ones {levels}'
    )
  spacing = float(d.get('pixel_spacing_mm') or 0.0)
  if not spacing >= 0:
    raise ValueError(
      f'config data.pixel_spacing_mm={spacing}; expected mm > 0, or 0 to resize to fit'
    )
  multiple = int(d.get('inference_size_multiple', 64))
  # The FPN adds P5 (stride 32) to P4 upsampled x2: input sides must be multiples of 32.
  if multiple < 32 or multiple % 32:
    raise ValueError(
      f'config data.inference_size_multiple={multiple}; expected a positive multiple of 32'
    )
  rate = float(d.get('crop_foreground_rate', 0.5))
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'config data.crop_foreground_rate={rate}; expected a value in [0, 1]')
  return PrepareSettings(
    image_size,
    int(d.max_instances),
    (levels.index(lo), levels.index(hi)),
    spacing or None,
    multiple,
    rate,
  )


def augment_settings(config: Any) -> AugmentSettings:
  a = config.data.augment
  return AugmentSettings(
    flip_lr=bool(a.flip_lr),
    flip_ud=bool(a.flip_ud),
    rotate_degrees=float(a.rotate_degrees),
    scale_range=tuple(float(s) for s in a.scale_range),
    gamma_range=tuple(float(g) for g in a.gamma_range),
    noise_std=float(a.noise_std),
    intensity_scale_range=tuple(float(g) for g in a.intensity_scale_range),
    contrast=contrast_augment.contrast_settings(a.get('contrast')),
  )


# --- per-example transforms (TensorFlow graph code) ----------------------------------------------


def fit_extent(
  height: tf.Tensor, width: tf.Tensor, image_size: tuple[int, int]
) -> tuple[tf.Tensor, tf.Tensor]:
  """The (H', W') a [height, width] slice is resized to: scaled by min(H / height, W / width)
  and rounded (half to even), at least 1 and at most the target, int32."""
  target_h, target_w = image_size
  height = tf.cast(height, tf.float64)
  width = tf.cast(width, tf.float64)
  factor = tf.minimum(target_h / height, target_w / width)
  new_h = tf.clip_by_value(tf.round(height * factor), 1, target_h)
  new_w = tf.clip_by_value(tf.round(width * factor), 1, target_w)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def normalize(
  image: tf.Tensor, percentiles: tf.Tensor, percentile_indices: tuple[int, int]
) -> tf.Tensor:
  """Clips to [p_low, p_high] of the volume and maps that range linearly onto [0, 1] (a
  constant volume becomes 0)."""
  low = percentiles[percentile_indices[0]]
  high = percentiles[percentile_indices[1]]
  span = tf.maximum(high - low, 1e-6)
  return (tf.clip_by_value(image, low, high) - low) / span


def select_instances(
  classes: tf.Tensor, masks: tf.Tensor, max_instances: int
) -> tuple[tf.Tensor, tf.Tensor]:
  """[N] classes and [N, H, W] masks -> exactly M rows: the M largest masks (ties: earlier
  first) in their original order, then zero padding."""
  areas = tf.reduce_sum(tf.cast(masks, tf.int32), axis=[1, 2])
  count = tf.minimum(tf.shape(classes)[0], max_instances)
  keep = tf.sort(tf.math.top_k(areas, k=count).indices)  # top_k puts the lower index first on ties
  missing = max_instances - count
  classes = tf.pad(tf.gather(classes, keep), [[0, missing]])
  masks = tf.pad(tf.gather(masks, keep), [[0, missing], [0, 0], [0, 0]])
  return (
    tf.ensure_shape(classes, [max_instances]),
    tf.ensure_shape(masks, [max_instances, None, None]),
  )


def spacing_extent(
  height: tf.Tensor, width: tf.Tensor, pixel_spacing: tf.Tensor, target_mm: float
) -> tuple[tf.Tensor, tf.Tensor]:
  """The (H', W') that resamples a [height, width] slice of `pixel_spacing` (row_mm, col_mm) to
  `target_mm` per pixel: round(size * spacing / target) (half to even), at least 1, int32."""
  spacing = tf.cast(pixel_spacing, tf.float64)
  new_h = tf.maximum(tf.round(tf.cast(height, tf.float64) * spacing[0] / target_mm), 1)
  new_w = tf.maximum(tf.round(tf.cast(width, tf.float64) * spacing[1] / target_mm), 1)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def bucket_size(extent: Sequence[int], multiple: int) -> tuple[int, int]:
  """The input size whole slices of `extent` (H, W) run at: each side rounded up to a multiple
  of `multiple`, so a cohort of scans compiles a handful of programs, not one per scan."""
  return tuple(int(-(-max(int(n), 1) // multiple) * multiple) for n in extent)


def _resize(image: tf.Tensor, masks: tf.Tensor, new_h: tf.Tensor, new_w: tf.Tensor):
  """image [H, W, C] float32, masks [M, H, W] uint8 -> image [new_h, new_w, C] (bilinear,
  antialiased when shrinking) and masks [new_h, new_w, M] uint8 (channels last, as cropping and
  warping want them; resampled the same way and thresholded at 0.5)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  channels = image.shape[-1]
  both = tf.concat([image, tf.transpose(tf.cast(masks, tf.float32), [1, 2, 0])], axis=-1)
  # At scale 1 the resize is the identity (one tap of weight 1 per pixel): skip it.
  both = tf.cond(
    (new_h == height) & (new_w == width),
    lambda: both,
    lambda: tf.image.resize(both, tf.stack([new_h, new_w]), method='bilinear', antialias=True),
  )
  return both[..., :channels], tf.cast(both[..., channels:] >= 0.5, tf.uint8)


def _pad(image: tf.Tensor, masks: tf.Tensor, size) -> tuple[tf.Tensor, tf.Tensor]:
  """Pads image [h, w, C] and masks [h, w, M] bottom/right with 0 to `size` (H, W)."""
  image = tf.image.pad_to_bounding_box(image, 0, 0, size[0], size[1])
  masks = tf.image.pad_to_bounding_box(masks, 0, 0, size[0], size[1])
  return image, masks


def prepare_example(
  example: dict[str, tf.Tensor], settings: PrepareSettings, pad_to: Sequence[int] | None = None
) -> dict[str, tf.Tensor]:
  """A stored example -> network-input example (normalised, resized, padded; no randomness).

  Resize-to-fit (settings.pixel_spacing_mm None): resized to fit image_size and padded to it.
  Scale-true: resampled to pixel_spacing_mm and padded to `pad_to` (H, W); without `pad_to`
  left at its resampled size, for `crop_example`. Masks stay channels-last, 'gt_masks'
  [H, W, M], until `finish_batch`.
  """
  image = normalize(example['image'], example['intensity_percentiles'], settings.percentile_indices)
  classes, masks = select_instances(example['classes'], example['masks'], settings.max_instances)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  if settings.scale_true:
    new_h, new_w = spacing_extent(
      height, width, example['pixel_spacing'], settings.pixel_spacing_mm
    )
  else:
    new_h, new_w = fit_extent(height, width, settings.image_size)
    pad_to = settings.image_size
  image, masks = _resize(image, masks, new_h, new_w)
  if pad_to is not None:
    image, masks = _pad(image, masks, pad_to)
    channels, count = image.shape[-1], masks.shape[-1]
    if all(isinstance(n, int) for n in pad_to):
      image = tf.ensure_shape(image, [*pad_to, channels])
      masks = tf.ensure_shape(masks, [*pad_to, count])
  extent = tf.stack([new_h, new_w])
  return {
    'image': image,
    'gt_classes': classes,
    'gt_masks': masks,
    'case_id': example['case_id'],
    'slice_index': example['slice_index'],
    'scale': tf.cast(extent, tf.float32) / tf.cast(tf.stack([height, width]), tf.float32),
    'image_extent': extent,
    'pixel_spacing': example['pixel_spacing'],
    'example_valid': tf.constant(True),
  }


def _crop_start(length: tf.Tensor, crop: int, anchor: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
  """A crop start in [0, length - crop] (0 when the crop is longer), drawn uniformly with `u` in
  [0, 1) among those whose window holds pixel `anchor` (anchor < 0: among all)."""
  last = tf.maximum(length - crop, 0)
  low = tf.where(anchor >= 0, tf.clip_by_value(anchor - crop + 1, 0, last), 0)
  high = tf.where(anchor >= 0, tf.clip_by_value(anchor, 0, last), last)
  return low + tf.cast(tf.floor(u * tf.cast(high - low + 1, tf.float32)), tf.int32)


def crop_example(
  example: dict[str, tf.Tensor], seed: tf.Tensor, settings: PrepareSettings
) -> dict[str, tf.Tensor]:
  """A scale-true training crop: an image_size window of the resampled slice (padded with 0
  where the slice is smaller), placed over a random labelled pixel with probability
  crop_foreground_rate (and always where that pixel allows it), else anywhere. seed: int32 [2].

  Instances the window cuts keep their visible part; `finish_batch` drops the vanished ones.
  """
  draws = tf.random.stateless_uniform([4], seed)
  image, masks = example['image'], example['gt_masks']
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  crop_h, crop_w = settings.image_size
  labelled = tf.cast(tf.where(tf.reduce_any(masks > 0, axis=-1)), tf.int32)  # [K, 2] (row, col)
  count = tf.shape(labelled)[0]
  # Row K is (-1, -1), "no anchor": what an unlabelled slice or a free crop reads.
  labelled = tf.concat([labelled, tf.constant([[-1, -1]])], axis=0)
  pick = tf.minimum(tf.cast(draws[1] * tf.cast(count, tf.float32), tf.int32), count - 1)
  use_labelled = (count > 0) & (draws[0] < settings.crop_foreground_rate)
  anchor = tf.gather(labelled, tf.where(use_labelled, pick, count))
  top = _crop_start(height, crop_h, anchor[0], draws[2])
  left = _crop_start(width, crop_w, anchor[1], draws[3])
  rows, cols = tf.minimum(height, crop_h), tf.minimum(width, crop_w)
  image, masks = _pad(
    image[top : top + rows, left : left + cols],
    masks[top : top + rows, left : left + cols],
    settings.image_size,
  )
  return dict(
    example,
    image=tf.ensure_shape(image, [crop_h, crop_w, image.shape[-1]]),
    gt_masks=tf.ensure_shape(masks, [crop_h, crop_w, masks.shape[-1]]),
    image_extent=tf.stack([rows, cols]),
  )


def _inverse_warp(
  extent: tf.Tensor, angle: tf.Tensor, zoom: tf.Tensor, flip_x: tf.Tensor, flip_y: tf.Tensor
) -> tf.Tensor:
  """The projective-transform coefficients [8] (ImageProjectiveTransformV3) mapping an output
  pixel index (x, y) to the input index it samples, x_in = a0 x + a1 y + a2,
  y_in = b0 x + b1 y + b2: flip, rotate by `angle` (radians) and scale by `zoom` about the centre
  of the valid extent (pixel centres at integer indices)."""
  centre_y = (tf.cast(extent[0], tf.float32) - 1.0) / 2.0
  centre_x = (tf.cast(extent[1], tf.float32) - 1.0) / 2.0
  cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
  sign_x = tf.where(flip_x, -1.0, 1.0)
  sign_y = tf.where(flip_y, -1.0, 1.0)
  # input - centre = F R(-angle) (output - centre) / zoom, F = diag(sign_x, sign_y)
  a0, a1 = sign_x * cos, sign_x * sin
  b0, b1 = -sign_y * sin, sign_y * cos
  a2 = centre_x - a0 * centre_x - a1 * centre_y
  b2 = centre_y - b0 * centre_x - b1 * centre_y
  return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def warp(image: tf.Tensor, masks: tf.Tensor, transform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Resamples image [H, W, C] bilinearly and masks [H, W, M] uint8 at their nearest pixel, at
  the input positions of `transform` (`_inverse_warp`); what falls outside reads 0.

  The image goes through ImageProjectiveTransformV3; the masks through one gather of whole
  pixel rows (M bytes each), which on CPU is several times cheaper than that op on M channels.
  """
  height, width, count = masks.shape
  image = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform[None],
    output_shape=tf.constant([height, width]),
    fill_value=0.0,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )[0]
  ys, xs = tf.meshgrid(
    tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing='ij'
  )
  col = tf.floor(transform[0] * xs + transform[1] * ys + transform[2] + 0.5)
  row = tf.floor(transform[3] * xs + transform[4] * ys + transform[5] + 0.5)
  inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
  # Index height * width is an extra row of zeros: where every outside position reads.
  index = tf.where(inside, tf.cast(row, tf.int32) * width + tf.cast(col, tf.int32), height * width)
  rows = tf.concat(
    [tf.reshape(masks, [height * width, count]), tf.zeros([1, count], tf.uint8)], axis=0
  )
  return image, tf.gather(rows, index)


def augment_example(
  example: dict[str, tf.Tensor], seed: tf.Tensor, augment: AugmentSettings
) -> dict[str, tf.Tensor]:
  """Random flips, rotation, scale (image and masks together), contrast randomisation (when
  set), intensity scale, gamma and noise. seed: int32 [2]."""
  seeds = tf.random.experimental.stateless_split(seed, num=6)

  def draw(i: int, low: float, high: float) -> tf.Tensor:
    if low == high:
      return tf.constant(low, tf.float32)
    return tf.random.stateless_uniform([], seeds[i], low, high)

  flip_x = tf.logical_and(augment.flip_lr, draw(0, 0.0, 1.0) < 0.5)
  flip_y = tf.logical_and(augment.flip_ud, draw(1, 0.0, 1.0) < 0.5)
  max_angle = math.radians(augment.rotate_degrees)
  angle = draw(2, -max_angle, max_angle)
  zoom = draw(3, *augment.scale_range)
  gamma = tf.exp(draw(4, math.log(augment.gamma_range[0]), math.log(augment.gamma_range[1])))

  image, masks, extent = example['image'], example['gt_masks'], example['image_extent']
  height, width, _ = image.shape
  image, masks = warp(image, masks, _inverse_warp(extent, angle, zoom, flip_x, flip_y))
  if augment.contrast is not None:
    # Its own seed (folded in), so the other draws stay those of runs without it.
    image = contrast_augment.randomize_contrast(
      image,
      masks,
      example['gt_classes'],
      extent,
      tf.random.experimental.stateless_fold_in(seed, CONTRAST_SEED_TAG),
      augment.contrast,
    )
  if augment.intensity_scale_range != (1.0, 1.0):
    # Its own seed (folded in), so the other draws stay those of runs without it.
    lo, hi = (math.log(v) for v in augment.intensity_scale_range)
    factor = tf.exp(
      tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 6), lo, hi)
    )
    image = tf.clip_by_value(image * factor, 0.0, 1.0)
  if augment.gamma_range != (1.0, 1.0):
    image = tf.pow(image, gamma)
  if augment.noise_std > 0:
    inside = (tf.range(height)[:, None] < extent[0]) & (tf.range(width)[None, :] < extent[1])
    noise = tf.random.stateless_normal(tf.shape(image), seeds[5], stddev=augment.noise_std)
    image = tf.clip_by_value(image + noise * tf.cast(inside, tf.float32)[..., None], 0.0, 1.0)
  return dict(example, image=image, gt_masks=masks)


def tight_boxes(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """uint8 [B, H, W, M] -> (boxes float32 [B, M, 4] (y1, x1, y2, x2), y2 = last row + 1, zeros
  for an empty mask; non_empty bool [B, M])."""
  rows = tf.reduce_any(masks > 0, axis=2)  # [B, H, M]
  cols = tf.reduce_any(masks > 0, axis=1)  # [B, W, M]
  height, width = tf.shape(masks)[1], tf.shape(masks)[2]
  row_index = tf.range(height)[None, :, None]
  col_index = tf.range(width)[None, :, None]
  y1 = tf.reduce_min(tf.where(rows, row_index, height), axis=1)
  y2 = tf.reduce_max(tf.where(rows, row_index + 1, 0), axis=1)
  x1 = tf.reduce_min(tf.where(cols, col_index, width), axis=1)
  x2 = tf.reduce_max(tf.where(cols, col_index + 1, 0), axis=1)
  non_empty = tf.reduce_any(rows, axis=1)
  boxes = tf.cast(tf.stack([y1, x1, y2, x2], axis=-1), tf.float32)
  return tf.where(non_empty[..., None], boxes, 0.0), non_empty


def finish_batch(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """On a batch [B, ...]: tight boxes from the final masks, instances whose mask is empty
  dropped (class 0, invalid), valid ones moved first; masks to [B, M, H, W]."""
  boxes, non_empty = tight_boxes(batch['gt_masks'])
  valid = non_empty & (batch['gt_classes'] > 0)
  order = tf.argsort(tf.cast(~valid, tf.int32), axis=-1, stable=True)
  valid = tf.gather(valid, order, batch_dims=1)
  masks = tf.gather(tf.transpose(batch['gt_masks'], [0, 3, 1, 2]), order, batch_dims=1)
  return dict(
    batch,
    gt_classes=tf.where(valid, tf.gather(batch['gt_classes'], order, batch_dims=1), 0),
    gt_boxes=tf.where(valid[..., None], tf.gather(boxes, order, batch_dims=1), 0.0),
    gt_masks=masks * tf.cast(valid, tf.uint8)[..., None, None],
    gt_valid=valid,
  )


# The crop's seed is folded from the example's seed with this tag, so that the augmentation
# draws (from the example's seed itself) are those of a resize-to-fit run.
CROP_SEED_TAG = 1
# The contrast randomisation's seed: the example's seed folded with this tag.
CONTRAST_SEED_TAG = 7
