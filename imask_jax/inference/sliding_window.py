"""Sliding-window inference for the U-Net, as nnU-Net predicts (`model.unet.sliding_window`).

A slice larger than the trained crop (`data.image_size`, the window) is covered by windows of
that size; each window's logits are weighted by a Gaussian importance map centred on it, summed,
and divided by the summed weights, then turned into probabilities. So every pixel is predicted
on a canvas of the size the network trained on (its instance norm averages over what it averaged
over in training) and mostly from windows in which it lies near the centre.

nnU-Net's choices (nnunetv2/inference/sliding_window_prediction.py and predict_from_raw_data.py,
v2) taken:
  * window positions per axis (`window_starts`): n = ceil((size - window) / (window x step)) + 1
    windows with step = 1 - overlap (nnU-Net's tile_step_size 0.5: overlap 0.5), spread evenly
    from 0 to size - window and rounded; an axis shorter than the window is padded (with zeros,
    bottom / right, as the input pipeline pads) to the window;
  * the importance map (`gaussian_importance`): a Gaussian with sigma = window / 8 per axis centred
    on pixel window // 2, as nnU-Net's compute_gaussian (a delta smoothed by
    scipy.ndimage.gaussian_filter, truncated at 4 sigma, divided by its maximum, zeros raised to
    the smallest non-zero value);
  * logits, not probabilities, are weighted and averaged, and the softmax comes after.
Not taken: test-time mirroring (nnU-Net averages over flipped inputs too: 4x the cost in 2D),
its float16 accumulation (float32 here). Added: interior window starts are rounded to multiples
of the net's coarsest stride (`UNetSpec.size_multiple`) where that still covers the axis, so
each window's stride-2 grid lines up with the whole slice's.

A slice that fits in the window in both axes runs whole, as without this setting.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_SCALE = 1.0 / 8  # nnU-Net's compute_gaussian: sigma = window / 8
TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default radius, in sigmas


def window_starts(size: int, window: int, overlap: float, multiple: int = 1) -> tuple[int, ...]:
  """Start offsets of the windows along one axis of `size` pixels.

  nnU-Net's rule with step = (1 - overlap) x window: n = ceil((size - window) / step) + 1 windows,
  the i-th at round(i x (size - window) / (n - 1)); one window at 0 where size <= window.
  multiple: interior starts are rounded to a multiple of it instead (the first stays 0, the last
  size - window) unless that would leave a pixel uncovered, then nnU-Net's are kept.
  """
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f'config model.unet.window_overlap={overlap}; expected 0 <= overlap < 1')
  if size <= window:
    return (0,)
  last = size - window
  count = int(np.ceil(last / (window * (1.0 - overlap)))) + 1
  actual = last / (count - 1)
  plain = [int(np.round(actual * i)) for i in range(count)]
  if multiple > 1:
    snapped = [min(int(np.round(actual * i / multiple)) * multiple, last) for i in range(count)]
    snapped = sorted(set(snapped[:-1] + [last]))
    if all(b - a <= window for a, b in zip(snapped, snapped[1:])):
      return tuple(snapped)
  return tuple(plain)


def gaussian_importance(window: tuple[int, int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
  """float32 [h, w]: nnU-Net's importance map of a window (see the module docstring): the product
  over axes of exp(-d^2 / (2 sigma^2)), d the distance from pixel n // 2 and sigma = n x
  sigma_scale, zero beyond the 4-sigma truncation radius, maximum 1, zeros raised to the
  smallest non-zero value."""
  axes = []
  for n in window:
    sigma = n * sigma_scale
    d = np.arange(n) - n // 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    g[np.abs(d) > int(TRUNCATE * sigma + 0.5)] = 0.0
    axes.append(g)
  weights = np.outer(axes[0], axes[1])
  weights /= weights.max()
  weights[weights == 0] = weights[weights > 0].min()
  return weights.astype(np.float32)


def positions(
  image_size: tuple[int, int], window: tuple[int, int], overlap: float, multiple: int = 1
) -> tuple[tuple[int, int], ...]:
  """(row, col) of every window's top-left corner on a canvas of `image_size` padded up to the
  window where smaller, rows outer."""
  rows = window_starts(max(image_size[0], window[0]), window[0], overlap, multiple)
  cols = window_starts(max(image_size[1], window[1]), window[1], overlap, multiple)
  return tuple((r, c) for r in rows for c in cols)


def window_logits(
  apply: Callable[[jax.Array], jax.Array],
  images: jax.Array,
  window: tuple[int, int],
  overlap: float,
  *,
  multiple: int = 1,
  gaussian: bool = True,
) -> jax.Array:
  """Logits of `images` float [N, H, W, C] from windows: apply maps [N, h, w, C] windows
  (h, w = `window`) to logits [N, h, w, K]; returns the importance-weighted mean float32
  [N, H, W, K] (uniform weights without `gaussian`). Traceable: the windows run one after the
  other in a `lax.scan` (memory of one window batch), positions fixed at trace time."""
  n, height, width, channels = images.shape
  wh, ww = window
  canvas = (max(height, wh), max(width, ww))
  images = jnp.pad(images, ((0, 0), (0, canvas[0] - height), (0, canvas[1] - width), (0, 0)))
  corners = positions((height, width), window, overlap, multiple)
  weights = gaussian_importance(window) if gaussian else np.ones(window, np.float32)
  total = np.zeros(canvas, np.float64)
  for r, c in corners:
    total[r : r + wh, c : c + ww] += weights
  classes = jax.eval_shape(apply, jax.ShapeDtypeStruct((n, wh, ww, channels), images.dtype))
  classes = classes.shape[-1]
  w = jnp.asarray(weights)[None, :, :, None]

  def add_window(acc, corner):
    start = (0, corner[0], corner[1], 0)
    crop = jax.lax.dynamic_slice(images, start, (n, wh, ww, channels))
    logits = apply(crop).astype(jnp.float32) * w
    current = jax.lax.dynamic_slice(acc, start, (n, wh, ww, classes))
    return jax.lax.dynamic_update_slice(acc, current + logits, start), None

  acc = jnp.zeros((n, *canvas, classes), jnp.float32)
  acc, _ = jax.lax.scan(add_window, acc, jnp.asarray(corners, jnp.int32))
  mean = acc / jnp.asarray(total, jnp.float32)[None, :, :, None]
  return mean[:, :height, :width]
