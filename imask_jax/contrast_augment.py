"""Contrast randomisation of training examples (SynthSeg's lesson: randomise what must not matter).

A model trained on one phantom contrast learns that contrast. `randomize_contrast`, a training
option (`data.augment.contrast`, off by default; `contrast_settings` reads it), redraws a
network-input example's contrast from its own label masks, so that only the shapes stay
informative: per-tissue intensities, the unlabelled rest, a bias field, blur, a resolution
change, Rician noise and gamma, in that order. Each example is randomised with probability
`rate`; randomness is stateless from the example's seed. Intensities are in units of the
normalised [0, 1] image, sigmas in network pixels. Shapes: image [H, W, C] float32 in [0, 1],
masks [H, W, M] uint8, classes [M] int32 (0 = padding), extent [2] int32 (valid rows, columns);
H, W, C, M static.

The seven steps with their distributions and settings: docs/data.md, 'Contrast randomisation'.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf

# Class ids 1 .. MAX_CLASSES get tissue maps; a larger id is left to the unlabelled curve.
MAX_CLASSES = 16
# Binomial kernel (1 4 6 4 1) / 16: the soft tissue weights' smoothing, 2 px reach.
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
# Monomials u^i v^j (1 <= i + j <= 3) of the bias field's log.
_BIAS_TERMS = tuple((i, j) for i in range(4) for j in range(4) if 1 <= i + j <= 3)
# Seeds split per example: 0 the rate, 1-3 tissues and curve, 4-5 bias, 6 blur, 7 resolution,
# 8-9 noise, 10 gamma.
_STAGES = 11
# Histogram bins the unlabelled curve's quantiles are read from (a sort of every pixel costs
# several times the rest of the stage).
QUANTILE_BINS = 1024


@dataclasses.dataclass(frozen=True)
class ContrastSettings:
  """Ranges of the per-example draws (docs/data.md, 'Contrast randomisation'); intensities in
  units of the normalised [0, 1] image, sigmas in network pixels. tissues False skips steps
  1-2."""

  rate: float = 1.0
  tissues: bool = True
  tissue_mean_range: tuple[float, float] = (0.0, 1.0)
  tissue_texture_range: tuple[float, float] = (0.5, 2.0)
  background_knots: int = 4
  air_level: float = 0.05
  bias_max: float = 0.4
  blur_sigma_max: float = 1.0
  downsample_max: float = 3.0
  noise_std_max: float = 0.04
  gamma_range: tuple[float, float] = (0.7, 1.4)

  def __post_init__(self):
    def bad(name, expected):
      return ValueError(
        f'config data.augment.contrast.{name}={getattr(self, name)}; expected {expected}'
      )

    if not 0.0 <= self.rate <= 1.0:
      raise bad('rate', 'a share in [0, 1]')
    lo, hi = self.tissue_mean_range
    if not 0.0 <= lo <= hi <= 1.0:
      raise bad('tissue_mean_range', '0 <= low <= high <= 1')
    for name in ('tissue_texture_range', 'gamma_range'):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise bad(name, '0 < low <= high')
    if self.background_knots < 1:
      raise bad('background_knots', 'at least 1')
    if not 0.0 <= self.air_level < 1.0:
      raise bad('air_level', 'a level in [0, 1)')
    for name in ('bias_max', 'blur_sigma_max', 'noise_std_max'):
      if not getattr(self, name) >= 0:
        raise bad(name, '>= 0')
    if not self.downsample_max >= 1.0:
      raise bad('downsample_max', 'a factor >= 1 (1: no resolution change)')


def contrast_settings(config_dict: Any) -> ContrastSettings | None:
  """`data.augment.contrast` (a ConfigDict or None) -> settings, or None when absent or not
  enabled (a config may lack the group)."""
  if config_dict is None or not bool(config_dict.get('enabled', False)):
    return None
  fields = {f.name: f for f in dataclasses.fields(ContrastSettings)}
  unknown = sorted(set(config_dict.keys()) - set(fields) - {'enabled'})
  if unknown:
    raise ValueError(
      f'config data.augment.contrast: unknown field(s) {unknown}; expected some of '
      f'{["enabled", *fields]}'
    )
  values = {}
  for name, value in config_dict.items():
    if name == 'enabled':
      continue
    if name.endswith('_range'):
      values[name] = tuple(float(v) for v in value)
    elif name == 'tissues':
      values[name] = bool(value)
    elif name == 'background_knots':
      values[name] = int(value)
    else:
      values[name] = float(value)
  return ContrastSettings(**values)


# --- the stages ----------------------------------------------------------------------------


def inside_extent(shape: tuple[int, int], extent: tf.Tensor) -> tf.Tensor:
  """bool [H, W]: True in the valid extent (the top-left extent[0] x extent[1] pixels)."""
  rows = tf.range(shape[0])[:, None] < extent[0]
  cols = tf.range(shape[1])[None, :] < extent[1]
  return rows & cols


def smooth(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
  """Separable, zero-padded 'same' convolution of x [H, W, K] by the 1-D kernel along both
  axes (each channel on its own)."""
  k = tf.shape(kernel)[0]
  channels = x.shape[-1]
  rows = tf.tile(tf.reshape(kernel, [k, 1, 1, 1]), [1, 1, channels, 1])
  cols = tf.tile(tf.reshape(kernel, [1, k, 1, 1]), [1, 1, channels, 1])
  out = tf.nn.depthwise_conv2d(x[None], rows, [1, 1, 1, 1], 'SAME')
  return tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], 'SAME')[0]


def tissue_weights(masks: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """masks [H, W, M] float -> (weights [H, W, M], background weight [H, W]): the masks
  smoothed by the binomial kernel, scaled down where they sum above 1 (overlaps), the
  background taking the rest; the weights of a pixel sum to 1."""
  soft = smooth(masks, tf.constant(_BINOMIAL, tf.float32))
  total = tf.reduce_sum(soft, axis=-1, keepdims=True)
  soft = soft / tf.maximum(total, 1.0)
  return soft, 1.0 - tf.reduce_sum(soft, axis=-1)


def interpolate(x: tf.Tensor, knots_x: tf.Tensor, knots_y: tf.Tensor) -> tf.Tensor:
  """Piecewise-linear curve through (knots_x, knots_y) (knots_x non-decreasing, [K >= 2])
  evaluated at x (any shape); constant beyond the last knot."""
  flat = tf.reshape(x, [1, -1])
  count = tf.shape(knots_x)[0]
  upper = tf.clip_by_value(tf.searchsorted(knots_x[None], flat, side='right')[0], 1, count - 1)
  x0, x1 = tf.gather(knots_x, upper - 1), tf.gather(knots_x, upper)
  y0, y1 = tf.gather(knots_y, upper - 1), tf.gather(knots_y, upper)
  t = tf.clip_by_value((flat[0] - x0) / tf.maximum(x1 - x0, 1e-6), 0.0, 1.0)
  return tf.reshape(y0 + t * (y1 - y0), tf.shape(x))


def background_knots(
  image: tf.Tensor, unlabelled: tf.Tensor, settings: ContrastSettings, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
  """The unlabelled curve's knots: (0, 0), (air, air), then the quantiles at levels
  i / n (i = 1 .. n, n = background_knots) of the unlabelled pixels brighter than air
  (unlabelled [H, W] bool; all channels), each mapped to a uniform draw in [0, 1]. A quantile
  is the upper edge of the histogram bin (QUANTILE_BINS over (air, 1]) where the cumulative
  count first reaches level x count. Without such pixels the positions spread evenly."""
  n = settings.background_knots
  air = settings.air_level
  values = tf.boolean_mask(image, unlabelled)  # [P, C]
  values = tf.boolean_mask(values, values > air)
  counts = tf.histogram_fixed_width(values, [air, 1.0], nbins=QUANTILE_BINS)
  cumulative = tf.cast(tf.cumsum(counts), tf.float32)
  size = cumulative[-1]
  levels = tf.range(1, n + 1, dtype=tf.float32) / n
  first = tf.searchsorted(cumulative, levels * size, side='left')  # bin reaching each level
  edges = air + (1.0 - air) * tf.cast(first + 1, tf.float32) / QUANTILE_BINS
  positions = tf.where(size > 0, tf.minimum(edges, 1.0), air + levels * (1.0 - air))
  knots_x = tf.concat([[0.0, air], positions], axis=0)
  knots_y = tf.concat([[0.0, air], tf.random.stateless_uniform([n], seed)], axis=0)
  return knots_x, knots_y


def bias_field(shape: tuple[int, int], extent: tf.Tensor, strength: tf.Tensor, seed) -> tf.Tensor:
  """float32 [H, W] = exp(strength * t), t a polynomial of degree <= 3 in u, v (the extent's
  rows and columns mapped to [-1, 1]) with N(0, 1) coefficients, scaled to max |t| = 1 over
  the extent, so the field lies in [exp(-strength), exp(strength)] there."""
  size = tf.cast(tf.maximum(extent - 1, 1), tf.float32)
  u = 2.0 * tf.range(shape[0], dtype=tf.float32)[:, None] / size[0] - 1.0
  v = 2.0 * tf.range(shape[1], dtype=tf.float32)[None, :] / size[1] - 1.0
  coefficients = tf.random.stateless_normal([len(_BIAS_TERMS)], seed)
  t = tf.zeros(shape, tf.float32)
  for n, (i, j) in enumerate(_BIAS_TERMS):
    t = t + coefficients[n] * u**i * v**j
  inside = inside_extent(shape, extent)
  peak = tf.reduce_max(tf.where(inside, tf.abs(t), 0.0))
  return tf.exp(strength * t / tf.maximum(peak, 1e-6))


def gaussian_kernel(sigma: tf.Tensor, radius: int) -> tf.Tensor:
  """float32 [2 radius + 1], sums to 1; sigma near 0 gives the identity (a single 1)."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  w = tf.exp(-0.5 * tf.square(x / tf.maximum(sigma, 1e-3)))
  return w / tf.reduce_sum(w)


def change_resolution(image: tf.Tensor, factor: tf.Tensor, along_rows: tf.Tensor) -> tf.Tensor:
  """image [H, W, C] down-sampled by `factor` along rows (along_rows) or columns,
  antialiased, and interpolated back to [H, W, C] bilinearly."""
  height, width = image.shape[0], image.shape[1]

  def along(length: int) -> tf.Tensor:
    return tf.cast(tf.maximum(tf.round(length / factor), 1.0), tf.int32)

  low = tf.where(along_rows, tf.stack([along(height), width]), tf.stack([height, along(width)]))
  small = tf.image.resize(image, low, method='bilinear', antialias=True)
  back = tf.image.resize(small, [height, width], method='bilinear')
  return tf.ensure_shape(back, image.shape)


def remap_tissues(
  image: tf.Tensor,
  masks: tf.Tensor,
  classes: tf.Tensor,
  inside: tf.Tensor,
  settings: ContrastSettings,
  seeds: tf.Tensor,
) -> tf.Tensor:
  """Steps 1-2 of docs/data.md, 'Contrast randomisation': each class's affine map and the
  unlabelled curve, blended by the soft weights. seeds: int32 [3, 2].

  Worked per instance slot (M of them, fewer than the classes' table) with each slot's class
  parameters gathered: the blend sum_i w_i (m_k(i) + b_k(i) (x - mean_k(i))) is A + B x with
  per-pixel A, B, never an [H, W, C, K] tensor. A class's mean is over its instances' pixels
  (a pixel two instances share counts twice); an instance of class 0 or above MAX_CLASSES
  belongs to the unlabelled rest."""
  known = tf.cast((classes >= 1) & (classes <= MAX_CLASSES), tf.float32)  # [M]
  hard = tf.cast(masks, tf.float32) * known  # [H, W, M]
  weights, background = tissue_weights(hard)
  onehot = tf.one_hot(classes - 1, MAX_CLASSES, dtype=tf.float32)  # [M, K]; 0 -> zero row
  channel_mean = tf.reduce_mean(image, axis=-1)
  sums = tf.reduce_sum(hard * channel_mean[..., None], axis=[0, 1])  # [M]
  counts = tf.reduce_sum(hard, axis=[0, 1])
  mean = tf.linalg.matvec(onehot, sums, transpose_a=True) / tf.maximum(
    tf.linalg.matvec(onehot, counts, transpose_a=True), 1.0
  )  # [K]
  target = tf.random.stateless_uniform([MAX_CLASSES], seeds[0], *settings.tissue_mean_range)
  lo, hi = (math.log(v) for v in settings.tissue_texture_range)
  gain = tf.exp(tf.random.stateless_uniform([MAX_CLASSES], seeds[1], lo, hi))
  slot_offset = tf.linalg.matvec(onehot, target - gain * mean)  # [M]
  slot_gain = tf.linalg.matvec(onehot, gain)
  offset = tf.tensordot(weights, slot_offset, axes=1)[..., None]  # [H, W, 1]
  slope = tf.tensordot(weights, slot_gain, axes=1)[..., None]
  unlabelled = inside & (tf.reduce_sum(hard, axis=-1) == 0)
  knots_x, knots_y = background_knots(image, unlabelled, settings, seeds[2])
  curve = interpolate(image, knots_x, knots_y)
  return background[..., None] * curve + offset + slope * image


def randomize_contrast(
  image: tf.Tensor,
  masks: tf.Tensor,
  classes: tf.Tensor,
  extent: tf.Tensor,
  seed: tf.Tensor,
  settings: ContrastSettings,
) -> tf.Tensor:
  """Steps 1-7 of docs/data.md, 'Contrast randomisation', on one example, with probability
  settings.rate; image [H, W, C] float32 in [0, 1] -> the same shape, 0 outside the valid
  extent. seed: int32 [2]."""
  seeds = tf.random.experimental.stateless_split(seed, num=_STAGES)
  height, width, channels = image.shape
  inside = inside_extent((height, width), extent)

  def uniform(i: int, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seeds[i], low, high)

  def redraw() -> tf.Tensor:
    out = image
    if settings.tissues:
      out = remap_tissues(out, masks, classes, inside, settings, seeds[1:4])
      out = tf.maximum(out, 0.0)
    if settings.bias_max > 0:
      strength = uniform(4, 0.0, settings.bias_max)
      out = out * bias_field((height, width), extent, strength, seeds[5])[..., None]
    if settings.blur_sigma_max > 0:
      radius = math.ceil(3 * settings.blur_sigma_max)
      kernel = gaussian_kernel(uniform(6, 0.0, settings.blur_sigma_max), radius)
      out = smooth(out, kernel)
    if settings.downsample_max > 1:
      draws = tf.random.stateless_uniform([2], seeds[7])
      factor = 1.0 + draws[0] * (settings.downsample_max - 1.0)
      out = change_resolution(out, factor, draws[1] < 0.5)
    if settings.noise_std_max > 0:
      noise = tf.random.stateless_normal([2, height, width, channels], seeds[8])
      sigma = uniform(9, 0.0, settings.noise_std_max)
      out = tf.sqrt(tf.square(out + sigma * noise[0]) + tf.square(sigma * noise[1]))
    out = tf.where(inside[..., None], out, 0.0)
    flat = tf.reshape(tf.boolean_mask(out, inside), [-1])
    # The 99.5th percentile: the smallest of the top 0.5 % (top_k, not a sort of every pixel).
    above = tf.maximum(tf.cast(0.005 * tf.cast(tf.size(flat), tf.float32), tf.int32), 1)
    top = tf.reduce_min(tf.math.top_k(flat, above, sorted=False).values)
    out = tf.clip_by_value(out / tf.maximum(top, 1.0), 0.0, 1.0)
    if settings.gamma_range != (1.0, 1.0):
      lo, hi = (math.log(v) for v in settings.gamma_range)
      out = tf.pow(out, tf.exp(uniform(10, lo, hi)))
    return tf.ensure_shape(out, image.shape)

  if settings.rate >= 1.0:
    return redraw()
  return tf.cond(uniform(0, 0.0, 1.0) < settings.rate, redraw, lambda: image)
