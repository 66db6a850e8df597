"""Augmentation geometry against analytic geometry, not against the transform the code made.

Convention (pixel centres at integer indices, x = column to the right, y = row down): the
augmentation flips about the centre c = ((h - 1) / 2, (w - 1) / 2) of the valid extent h x w,
then rotates by the angle t (positive turns +x towards +y) and scales by z about c:

  out - c = z R(t) F (in - c),  R(t) = [[cos t, -sin t], [sin t, cos t]],  F = diag(+-1, +-1).

Probes: a Gaussian spot in the image (its intensity centroid must land at `out`) and a filled
ellipse in a mask (its centroid lands at `out`, its area scales by z^2, its major axis turns by
t). Tolerances: a wrong sign of t, the padded image's centre instead of the extent's, or 1 / z
instead of z moves these probes by 2 px or more (computed in the test); bilinear resampling
moves a symmetric spot's centroid by well under 0.1 px (0.1 px: the spot's tolerance) and
nearest-pixel masks put each pixel up to 0.5 px off, which on the ~25 edge pixels of a ~50
pixel ellipse shifts its centroid by up to ~0.2 px (0.25 px), turns its axis by up to ~2
degrees (3 degrees) and changes its area, against the source mask's z^2 times, by a few edge
pixels (8%).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from imask_jax import slice_transforms

H, W = 30, 40  # the padded network input
EXTENT = (26, 32)  # the valid extent (a resized slice), top-left
CENTRE = np.array([(EXTENT[1] - 1) / 2, (EXTENT[0] - 1) / 2])  # (x, y)
SPOT = np.array([19.0, 7.0])  # (x, y) of the image probe
ELLIPSE = np.array([10.0, 16.0])  # (x, y) centre of the mask probe
AXES = (5.0, 2.5)  # semi-axes along x and y before the warp


def probes():
  """image [H, W, 1] with a Gaussian spot (sigma 1.3 px), masks [H, W, 1] with an ellipse."""
  ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
  image = np.exp(-((xs - SPOT[0]) ** 2 + (ys - SPOT[1]) ** 2) / (2 * 1.3**2))
  ellipse = ((xs - ELLIPSE[0]) / AXES[0]) ** 2 + ((ys - ELLIPSE[1]) / AXES[1]) ** 2 <= 1
  return image[..., None].astype(np.float32), ellipse[..., None].astype(np.uint8)


def expected(point, angle, zoom, flip_x=False, flip_y=False, centre=CENTRE):
  d = (point - centre) * np.array([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0])
  c, s = math.cos(angle), math.sin(angle)
  return centre + zoom * np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def centroid(weights):
  ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
  total = weights.sum()
  return np.array([(xs * weights).sum() / total, (ys * weights).sum() / total])


def major_axis_degrees(mask):
  """Angle of the major axis of a binary mask's second moments, in (-90, 90], from +x to +y."""
  ys, xs = np.nonzero(mask)
  cov = np.cov(np.stack([xs, ys]).astype(np.float64))
  values, vectors = np.linalg.eigh(cov)
  vx, vy = vectors[:, np.argmax(values)]
  angle = math.degrees(math.atan2(vy, vx))
  return (angle + 90) % 180 - 90


def axis_difference(a, b):
  return abs((a - b + 90) % 180 - 90)


def warp(angle, zoom, flip_x=False, flip_y=False):
  image, masks = probes()
  transform = slice_transforms._inverse_warp(
    tf.constant(EXTENT),
    tf.constant(angle, tf.float32),
    tf.constant(zoom, tf.float32),
    tf.constant(flip_x),
    tf.constant(flip_y),
  )
  out_image, out_masks = slice_transforms.warp(tf.constant(image), tf.constant(masks), transform)
  return out_image.numpy()[..., 0], out_masks.numpy()[..., 0]


@pytest.mark.parametrize(
  'angle,zoom,flip_x,flip_y',
  [
    (0.5, 1.2, False, False),
    (-0.35, 0.8, False, False),
    (0.3, 1.1, True, False),
    (-0.2, 1.0, False, True),
  ],
)
def test_warp_moves_points_and_shapes_as_the_analytic_similarity(angle, zoom, flip_x, flip_y):
  image, mask = warp(angle, zoom, flip_x, flip_y)
  spot = expected(SPOT, angle, zoom, flip_x, flip_y)
  np.testing.assert_allclose(centroid(image), spot, atol=0.1)
  # What the plausible mistakes would give is far outside that tolerance: the opposite turn,
  # the inverse zoom, the padded image's centre.
  wrongs = [
    expected(SPOT, -angle, zoom, flip_x, flip_y),
    expected(SPOT, angle, zoom, flip_x, flip_y, centre=np.array([(W - 1) / 2, (H - 1) / 2])),
  ]
  if zoom != 1:
    wrongs.append(expected(SPOT, angle, 1 / zoom, flip_x, flip_y))
  assert min(np.linalg.norm(w - spot) for w in wrongs) > 1.0

  np.testing.assert_allclose(
    centroid(mask.astype(np.float64)), expected(ELLIPSE, angle, zoom, flip_x, flip_y), atol=0.25
  )
  source_area = float(probes()[1].sum())
  assert abs(mask.sum() - zoom**2 * source_area) < 0.08 * zoom**2 * source_area
  # The major axis (along x before the warp) turns by the angle; a flip mirrors it first,
  # which leaves an axis along x unchanged.
  assert axis_difference(major_axis_degrees(mask), math.degrees(angle)) < 3.0


def test_rotation_is_about_the_valid_extent_not_the_padded_image():
  """A point at the centre of the valid extent stays put under any rotation and zoom; the
  padded image's centre, 2 and 4 px away, would move it."""
  image = np.zeros((H, W, 1), np.float32)
  ys, xs = np.mgrid[0:H, 0:W]
  image[..., 0] = np.exp(-((xs - CENTRE[0]) ** 2 + (ys - CENTRE[1]) ** 2) / (2 * 1.3**2))
  masks = np.zeros((H, W, 1), np.uint8)
  transform = slice_transforms._inverse_warp(
    tf.constant(EXTENT), tf.constant(0.6), tf.constant(1.3), tf.constant(False), tf.constant(False)
  )
  out, _ = slice_transforms.warp(tf.constant(image), tf.constant(masks), transform)
  np.testing.assert_allclose(centroid(out.numpy()[..., 0]), CENTRE, atol=0.25)
  padded_centre = np.array([(W - 1) / 2, (H - 1) / 2])
  assert np.linalg.norm(padded_centre - CENTRE) > 4


def only(**on) -> slice_transforms.AugmentSettings:
  """Augmentation settings with every part off but the ones given."""
  off = dict(
    flip_lr=False,
    flip_ud=False,
    rotate_degrees=0.0,
    scale_range=(1.0, 1.0),
    gamma_range=(1.0, 1.0),
    noise_std=0.0,
    intensity_scale_range=(1.0, 1.0),
  )
  return slice_transforms.AugmentSettings(**{**off, **on})


def test_augment_example_keeps_image_and_masks_together_within_the_drawn_range():
  """Through augment_example (angle drawn in +-25 degrees, zoom fixed at 1.25, no flips, gamma
  or noise): the spot's distance from the extent centre grows by exactly the zoom, its turn is
  within the range and differs between seeds, and the ellipse turns by the same angle."""
  image, masks = probes()
  settings = only(rotate_degrees=25.0, scale_range=(1.25, 1.25))
  example = {
    'image': tf.constant(image),
    'gt_masks': tf.constant(masks),
    'image_extent': tf.constant(EXTENT, tf.int32),
  }
  turns = []
  for seed in range(4):
    out = slice_transforms.augment_example(example, tf.constant([seed, 7], tf.int32), settings)
    spot = centroid(out['image'].numpy()[..., 0])
    before, after = SPOT - CENTRE, spot - CENTRE
    assert np.linalg.norm(after) == pytest.approx(1.25 * np.linalg.norm(before), abs=0.25)
    turn = math.degrees(math.atan2(after[1], after[0]) - math.atan2(before[1], before[0]))
    turn = (turn + 180) % 360 - 180
    assert abs(turn) <= 25.0 + 2.0
    mask = out['gt_masks'].numpy()[..., 0]
    np.testing.assert_allclose(
      centroid(mask.astype(np.float64)), expected(ELLIPSE, math.radians(turn), 1.25), atol=0.35
    )
    assert axis_difference(major_axis_degrees(mask), turn) < 3.0
    turns.append(turn)
  assert max(turns) - min(turns) > 5.0  # the angle is drawn, not fixed


def test_intensity_scale_multiplies_within_the_drawn_range_and_clips_like_normalisation():
  """Only the intensity scale on (no warp, gamma or noise): the output is the input times one
  factor per example, drawn in the range (log-uniform, differing between seeds), clipped to
  [0, 1]; masks untouched; with the range (1, 1) the image is unchanged."""
  rng = np.random.default_rng(0)
  image = rng.uniform(0.0, 1.0, (H, W, 1)).astype(np.float32)
  masks = (rng.uniform(size=(H, W, 2)) > 0.5).astype(np.uint8)
  example = {
    'image': tf.constant(image),
    'gt_masks': tf.constant(masks),
    'image_extent': tf.constant((H, W), tf.int32),
  }

  def settings(scale_range):
    return only(intensity_scale_range=scale_range)

  factors = []
  for seed in range(6):
    out = slice_transforms.augment_example(
      example, tf.constant([seed, 3], tf.int32), settings((0.8, 1.25))
    )
    got = out['image'].numpy()
    np.testing.assert_array_equal(out['gt_masks'].numpy(), masks)
    unclipped = image > 0.05
    factor = float(np.median(got[unclipped & (got < 0.999)] / image[unclipped & (got < 0.999)]))
    assert 0.8 - 1e-6 <= factor <= 1.25 + 1e-6
    np.testing.assert_allclose(got, np.clip(image * factor, 0.0, 1.0), atol=1e-5)
    factors.append(factor)
  assert max(factors) - min(factors) > 0.1  # drawn, not fixed
  fixed = slice_transforms.augment_example(
    example, tf.constant([0, 3], tf.int32), settings((2.0, 2.0))
  )
  np.testing.assert_allclose(fixed['image'].numpy(), np.clip(2.0 * image, 0.0, 1.0), atol=1e-6)
  off = slice_transforms.augment_example(
    example, tf.constant([0, 3], tf.int32), settings((1.0, 1.0))
  )
  np.testing.assert_allclose(off['image'].numpy(), image, atol=1e-6)
  with pytest.raises(ValueError, match='intensity_scale_range'):
    settings((1.2, 0.9))
