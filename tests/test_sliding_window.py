"""The U-Net's sliding-window inference (inference/sliding_window.py, `Segmenter`): window
positions against nnU-Net's published rule and covering every pixel, the Gaussian importance map
against nnU-Net's way of making it (scipy's gaussian_filter of a delta), and equivalence with
whole-slice inference where both apply: one window over the whole slice gives the same
probabilities, and a network whose output is translation-equivariant away from its borders gives
the same label map."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import imask_jax  # noqa: F401  (sets the PRNG implementation)
from conftest import experiment_config
from imask_jax import parallel
from imask_jax.inference import programs, sliding_window
from imask_jax.models import build
from imask_jax.models.unet import UNet, UNetSpec, init_variables

# --- window positions ----------------------------------------------------------------------------


def nnunet_steps(size: int, tile: int, step: float) -> list[int]:
  """nnU-Net v2's compute_steps_for_sliding_window for one axis, as published."""
  target = tile * step
  count = int(np.ceil((size - tile) / target)) + 1
  actual = (size - tile) / (count - 1) if count > 1 else 99999999999
  return [int(np.round(actual * i)) for i in range(count)]


@pytest.mark.parametrize('size', [64, 65, 100, 110, 128, 175, 192, 384, 500])
@pytest.mark.parametrize('window', [32, 64, 128])
@pytest.mark.parametrize('overlap', [0.0, 0.25, 0.5, 0.75])
def test_window_starts_are_nnunets_and_cover_every_pixel(size, window, overlap):
  if size < window:
    assert sliding_window.window_starts(size, window, overlap) == (0,)
    return
  starts = sliding_window.window_starts(size, window, overlap)
  assert list(starts) == nnunet_steps(size, window, 1.0 - overlap)
  covered = np.zeros(size, int)
  for s in starts:
    covered[s : s + window] += 1
  assert covered.min() >= 1 and starts[0] == 0 and starts[-1] + window == size
  # Neighbours are at most a step apart (rounded): the overlap asked for, or more.
  assert max(np.diff(starts), default=0) <= round(window * (1.0 - overlap)) + 1
  for multiple in (2, 8, 16):
    snapped = sliding_window.window_starts(size, window, overlap, multiple)
    covered = np.zeros(size, int)
    for s in snapped:
      covered[s : s + window] += 1
    assert covered.min() >= 1 and snapped[0] == 0 and snapped[-1] + window == size
    if size % multiple == 0 and window % multiple == 0:
      assert all(s % multiple == 0 for s in snapped)


def test_the_example_of_nnunets_comment():
  # "image size of 110, patch size of 64 and step_size of 0.5: 3 steps at 0, 23, 46"
  assert sliding_window.window_starts(110, 64, 0.5) == (0, 23, 46)


def test_positions_cover_a_slice_smaller_than_the_window_in_one_axis():
  corners = sliding_window.positions((40, 200), (64, 64), 0.5)
  assert {r for r, _ in corners} == {0}
  assert sorted({c for _, c in corners}) == nnunet_steps(200, 64, 0.5)


def test_a_bad_overlap_is_refused():
  with pytest.raises(ValueError, match='window_overlap=1.0'):
    sliding_window.window_starts(200, 64, 1.0)


# --- the importance map --------------------------------------------------------------------------


def nnunet_gaussian(tile: tuple[int, int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """nnU-Net v2's compute_gaussian, in NumPy: a delta at tile // 2 smoothed by
  gaussian_filter (sigma tile / 8, constant mode), divided by its maximum, zeros raised to the
  smallest non-zero value (its value_scaling_factor cancels in the weighted mean)."""
  tmp = np.zeros(tile)
  tmp[tuple(n // 2 for n in tile)] = 1
  g = ndimage.gaussian_filter(tmp, [n * sigma_scale for n in tile], 0, mode='constant', cval=0)
  g = g / g.max()
  g[g == 0] = g[g != 0].min()
  return g


@pytest.mark.parametrize('tile', [(128, 128), (64, 96), (33, 20), (8, 8), (256, 40)])
def test_gaussian_importance_matches_nnunets(tile):
  ours = sliding_window.gaussian_importance(tile)
  assert ours.shape == tile and ours.dtype == np.float32
  np.testing.assert_allclose(ours, nnunet_gaussian(tile), rtol=1e-5, atol=1e-7)
  assert ours.max() == 1.0 and ours.min() > 0


# --- equivalence with whole slices ---------------------------------------------------------------


@functools.cache
def tiny_unet(depth: int, norm: str, crop: int = 32) -> tuple[UNet, dict]:
  spec = UNetSpec(image_size=(crop, crop), num_classes=2, depth=depth, width=4, norm=norm)
  model = UNet(spec)
  variables = jax.jit(functools.partial(init_variables, model))(jax.random.PRNGKey(1))
  if norm == 'batch':  # running statistics away from (0, 1), so that they matter
    variables = dict(variables)
    variables['batch_stats'] = jax.tree.map(
      lambda v: v + 0.1 * jax.random.uniform(jax.random.PRNGKey(2), v.shape),
      variables['batch_stats'],
    )
  return model, variables


def test_one_window_over_the_whole_slice_gives_its_probabilities():
  model, variables = tiny_unet(3, 'group')
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
  apply = lambda x: model.apply(variables, x, False)[0]
  windowed = jax.jit(lambda x: sliding_window.window_logits(apply, x, (32, 32), 0.5))(images)
  whole = apply(images)
  # Equal up to float32 rounding (x * w / w, and XLA fuses the jitted net differently).
  np.testing.assert_allclose(np.asarray(windowed), np.asarray(whole), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(
    np.asarray(jax.nn.softmax(windowed).argmax(-1)), np.asarray(jax.nn.softmax(whole).argmax(-1))
  )


# Probability tolerance of a translation-equivariant net (batch norm at inference: every layer
# local) between whole-slice and windowed inference. A pixel within the receptive field of a
# window's inner edge sees zeros there instead of the image, but a window that holds it near its
# middle outweighs that one (measured: max |difference| 6.1e-4 for a depth-2 net in 64 x 64
# windows, 3.8e-3 at depth 3, whose receptive field reaches further into each window).
EQUIVARIANT_TOLERANCE = 2e-3


def test_a_translation_equivariant_net_gives_the_whole_slice_label_map():
  model, variables = tiny_unet(2, 'batch', crop=64)
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 160, 128, 1))
  apply = lambda x: model.apply(variables, x, False)[0]
  windowed = jax.jit(lambda x: sliding_window.window_logits(apply, x, (64, 64), 0.5, multiple=2))(
    images
  )
  whole_probs = np.asarray(jax.nn.softmax(apply(images)))
  window_probs = np.asarray(jax.nn.softmax(windowed))
  difference = np.abs(window_probs - whole_probs).max()
  print('max |probability difference|', difference)
  assert difference < EQUIVARIANT_TOLERANCE
  ranked = np.sort(whole_probs, -1)
  clear = ranked[..., -1] - ranked[..., -2] > 2 * EQUIVARIANT_TOLERANCE
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(window_probs.argmax(-1)[clear], whole_probs.argmax(-1)[clear])
  # Instance norm is not equivariant (statistics over the whole canvas): the windows differ.
  model, variables = tiny_unet(2, 'group', crop=64)
  apply = lambda x: model.apply(variables, x, False)[0]
  windowed = sliding_window.window_logits(apply, images, (64, 64), 0.5, multiple=2)
  assert np.abs(np.asarray(windowed) - np.asarray(apply(images))).max() > 1e-3


def test_uniform_weights_average_the_windows():
  # A 'network' that returns its window's mean in every pixel: with uniform weights a pixel's
  # logit is the mean of the means of the windows holding it.
  images = jnp.arange(1 * 6 * 5, dtype=jnp.float32).reshape(1, 6, 5, 1) ** 1.5
  apply = lambda x: jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
  out = np.asarray(sliding_window.window_logits(apply, images, (4, 4), 0.5, gaussian=False))
  image = np.asarray(images)[0, ..., 0]
  for r in range(6):
    for c in range(5):
      means = [
        image[y : y + 4, x : x + 4].mean()
        for y, x in sliding_window.positions((6, 5), (4, 4), 0.5)
        if y <= r < y + 4 and x <= c < x + 4
      ]
      np.testing.assert_allclose(out[0, r, c, 0], np.mean(means), rtol=1e-6)


# --- the Segmenter -------------------------------------------------------------------------------


def test_the_segmenter_windows_only_slices_larger_than_the_crop():
  config = experiment_config('phantom_knee', 'unet,smoke')  # 64 x 64 crop, depth 4, width 8
  assert not config.model.unet.sliding_window  # whole slices by default
  config.model.unet.sliding_window = True
  model = build.build_model(config)
  mesh = parallel.data_mesh()
  variables = jax.jit(functools.partial(build.init_variables, model))(jax.random.PRNGKey(0))
  replicated = parallel.replicate(jax.device_get(variables), mesh)
  n = jax.device_count()
  windowed = programs.make_detect_fn(model, mesh)
  assert isinstance(windowed, programs.Segmenter)
  assert not windowed.windowed((64, 64)) and windowed.windowed((64, 96))
  config.model.unet.sliding_window = False
  whole = programs.make_detect_fn(build.build_model(config), mesh)
  small = jax.random.normal(jax.random.PRNGKey(4), (n, 64, 64, 1))
  a = windowed(replicated, parallel.shard_batch(np.asarray(small), mesh))
  b = whole(replicated, parallel.shard_batch(np.asarray(small), mesh))
  np.testing.assert_array_equal(np.asarray(a['probs']), np.asarray(b['probs']))
  large = jax.random.normal(jax.random.PRNGKey(5), (n, 64, 96, 1))
  out = windowed(replicated, parallel.shard_batch(np.asarray(large), mesh))
  apply = lambda x: model.apply(variables, x, False)[0]
  expected = jax.nn.softmax(
    sliding_window.window_logits(apply, large, (64, 64), 0.5, multiple=8), axis=-1
  )
  np.testing.assert_allclose(np.asarray(out['probs']), np.asarray(expected), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out['label_map']), np.asarray(out['probs']).argmax(-1))
  plain = whole(replicated, parallel.shard_batch(np.asarray(large), mesh))
  assert np.abs(np.asarray(out['probs']) - np.asarray(plain['probs'])).max() > 1e-4
