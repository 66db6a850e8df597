"""Point sampling of the PointRend-style head against plainly written NumPy references and the
project's mask paste (an independent statement of the box convention)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imask_jax  # noqa: F401  (sets the PRNG implementation)
from imask_jax.models import point_head
from imask_jax.models.spec import PointSpec
from imask_jax.ops import masks as mask_ops
from imask_jax.ops import points as point_ops


def numpy_bilinear(grid: np.ndarray, y: float, x: float) -> np.ndarray:
  """grid [H, W, C] at (y, x), pixel centres at integers, clamped to the border cells."""
  h, w = grid.shape[:2]
  y = min(max(y, 0.0), h - 1.0)
  x = min(max(x, 0.0), w - 1.0)
  out = np.zeros(grid.shape[2], np.float64)
  for i in range(h):
    for j in range(w):
      weight = max(0.0, 1 - abs(y - i)) * max(0.0, 1 - abs(x - j))
      out += weight * grid[i, j]
  return out


def test_bilinear_sample_of_a_stack_matches_numpy_inside_and_outside_the_grid():
  rng = np.random.default_rng(0)
  stack = rng.normal(size=(3, 7, 5, 2)).astype(np.float32)
  layer = np.array([2, 0, 1, 2])
  yx = rng.uniform(-2.0, 8.0, size=(4, 6, 2)).astype(np.float32)  # some outside the 7 x 5 grid
  yx[0, 0] = (6.0, 4.0)  # the last pixel centre exactly
  got = np.asarray(point_ops.bilinear_sample_stack(jnp.asarray(stack), layer, yx))
  want = np.array([[numpy_bilinear(stack[g], *p) for p in pts] for g, pts in zip(layer, yx)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  single = np.asarray(point_ops.bilinear_sample(jnp.asarray(stack[1]), yx[2]))
  np.testing.assert_allclose(single, want[2], rtol=1e-5, atol=1e-5)


def test_a_coarse_grid_read_at_pixel_centres_is_the_pasted_mask():
  """Reading an m x m mask at the box-normalised position of each image pixel centre inside
  the box gives the value `paste_mask_probs` paints there (the same box convention)."""
  rng = np.random.default_rng(1)
  m, size = 8, 40
  probs = rng.uniform(size=(m, m)).astype(np.float32)
  box = np.array([5.3, 7.8, 31.2, 22.6], np.float32)  # y1, x1, y2, x2
  pasted = np.asarray(mask_ops.paste_mask_probs(probs[None], box[None], (size, size)))[0]
  ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing='ij')
  inside = (ys >= box[0]) & (ys < box[2]) & (xs >= box[1]) & (xs < box[3])
  normalised = np.stack(
    [(ys[inside] - box[0]) / (box[2] - box[0]), (xs[inside] - box[1]) / (box[3] - box[1])], -1
  ).astype(np.float32)
  read = np.asarray(point_ops.sample_grid_at_roi_points(jnp.asarray(probs[..., None]), normalised))
  np.testing.assert_allclose(read[:, 0], pasted[inside], atol=1e-5)
  # and the points land where roi_points_to_image says
  back = np.asarray(point_ops.roi_points_to_image(normalised[None], box[None]))[0]
  np.testing.assert_allclose(back, np.stack([ys[inside], xs[inside]], -1), atol=1e-4)


def test_a_feature_map_of_stride_s_is_read_at_its_pixel_centres():
  """Map pixel k of stride s is centred on input coordinate (k + 0.5) s."""
  maps = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6, 1)
  centres = np.array([[[(1 + 0.5) * 4, (3 + 0.5) * 4], [(0.5) * 4, (5.5) * 4]]], np.float32)
  got = np.asarray(point_ops.sample_maps_at_image_points(jnp.asarray(maps), 4, [1], centres))
  np.testing.assert_allclose(got[0, :, 0], [maps[1, 1, 3, 0], maps[1, 0, 5, 0]])


def test_uncertain_points_take_the_most_uncertain_candidates_and_some_uniform_ones():
  """Logits 20 (v - 0.5): the uncertain share of the points lies on the band v ~ 0.5, the
  uniform share spreads over the box."""
  m = 28
  v = (np.arange(m) + 0.5) / m
  logits = np.broadcast_to(20.0 * (v[:, None] - 0.5), (m, m))
  coarse = jnp.asarray(np.stack([logits, -logits]), jnp.float32)  # two ROIs, same band
  num_points, importance = 100, 0.75
  pts = np.asarray(
    point_ops.uncertain_points(coarse, jax.random.PRNGKey(0), num_points, 3.0, importance)
  )
  assert pts.shape == (2, num_points, 2)
  assert np.all((pts >= 0) & (pts <= 1))
  uncertain, uniform = pts[:, :75], pts[:, 75:]
  # 75 of 300 uniform candidates nearest the band: a quarter of them, |v - 0.5| < ~0.125
  assert np.all(np.abs(uncertain[..., 0] - 0.5) < 0.2)
  assert np.abs(uniform[..., 0] - 0.5).max() > 0.3
  # every uncertain point is at least as uncertain as any uniform point it displaced: the
  # farthest chosen point is nearer the band than the median uniform draw
  assert np.abs(uncertain[..., 0] - 0.5).max() < np.median(np.abs(uniform[..., 0] - 0.5)) + 0.1


def test_uncertain_cells_are_the_cells_nearest_zero():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 6, 6)).astype(np.float32)
  index, centres = point_ops.uncertain_cells(jnp.asarray(logits), 5)
  index, centres = np.asarray(index), np.asarray(centres)
  for n in range(3):
    want = np.argsort(np.abs(logits[n]).ravel(), kind='stable')[:5]
    assert sorted(index[n]) == sorted(want)
    rows, cols = index[n] // 6, index[n] % 6
    np.testing.assert_allclose(centres[n], np.stack([rows + 0.5, cols + 0.5], -1) / 6)


def test_upsampling_matches_numpy_and_jax_image_resize():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 5, 5)).astype(np.float32)
  got = np.asarray(point_ops.upsample2x(jnp.asarray(logits)))
  assert got.shape == (2, 10, 10)
  want = np.zeros_like(got)
  for n in range(2):
    for i in range(10):
      for j in range(10):
        # fine cell centre (i + 0.5) / 10 of the box -> coarse index (i + 0.5) / 2 - 0.5
        y, x = (i + 0.5) / 2 - 0.5, (j + 0.5) / 2 - 0.5
        want[n, i, j] = numpy_bilinear(logits[n][..., None], y, x)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  resized = np.asarray(jax.image.resize(jnp.asarray(logits), (2, 10, 10), 'bilinear'))
  np.testing.assert_allclose(got, resized, atol=1e-5)


def test_point_targets_read_the_matched_ground_truth_mask():
  rng = np.random.default_rng(4)
  gt = (rng.uniform(size=(3, 12, 10)) > 0.5).astype(np.uint8)
  matched = np.array([2, 0])
  pts = rng.uniform(0, 12, size=(2, 7, 2)).astype(np.float32)
  got = np.asarray(point_head.point_targets(jnp.asarray(gt), matched, pts))
  want = np.array(
    [
      [numpy_bilinear(gt[g][..., None].astype(np.float64), y - 0.5, x - 0.5)[0] for y, x in p]
      for g, p in zip(matched, pts)
    ]
  )
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.min() >= 0 and got.max() <= 1


@pytest.fixture(scope='module')
def head_and_inputs():
  spec = PointSpec(enabled=True, dim=8, num_fc=2, image_patch=3, subdivision_steps=1)
  head = point_head.PointHead(spec, num_classes=3)
  rng = np.random.default_rng(5)
  pyramid = {'P2': jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)}
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 1)), jnp.float32)
  rois = jnp.asarray([[2.0, 3.0, 20.0, 30.0], [0.0, 0.0, 32.0, 16.0], [4.5, 4.5, 9.5, 28.0]])
  batch_index = jnp.asarray([0, 1, 1])
  coarse = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
  centre = jnp.full((3, 1, 2), 0.5)
  variables = head.init(jax.random.PRNGKey(0), centre, rois, batch_index, coarse, pyramid, images)
  return head, variables, (rois, batch_index, coarse, pyramid, images)


def _refined(head, variables, num_points, own, classes, inputs):
  """PointHead.refine with `subdivision_points = num_points` (same parameters)."""
  spec = dataclasses.replace(head.spec, subdivision_points=num_points)
  rois, batch_index, coarse, pyramid, images = inputs
  return np.asarray(
    point_head.PointHead(spec, num_classes=head.num_classes).apply(
      variables,
      own,
      rois,
      batch_index,
      coarse,
      pyramid,
      images,
      classes,
      method=point_head.PointHead.refine,
    )
  )


def test_subdivision_predicts_the_chosen_cells_and_keeps_the_rest_upsampled(head_and_inputs):
  head, variables, inputs = head_and_inputs
  rois, batch_index, coarse, pyramid, images = inputs
  classes = jnp.asarray([1, 3, 2])
  own = jnp.take_along_axis(coarse, (classes - 1)[:, None, None, None], axis=-1)[..., 0]
  # the point head evaluated at every cell centre of the 8 x 8 grid, each ROI's own class
  fine = (np.arange(8) + 0.5) / 8
  v, u = np.meshgrid(fine, fine, indexing='ij')
  grid_points = jnp.asarray(np.broadcast_to(np.stack([v.ravel(), u.ravel()], -1), (3, 64, 2)))
  per_class = np.asarray(head.apply(variables, grid_points, *inputs))
  dense = np.take_along_axis(per_class, (np.asarray(classes) - 1)[:, None, None], -1)[..., 0]
  dense = dense.reshape(3, 8, 8)
  # every cell predicted again: the dense evaluation
  refined = _refined(head, variables, 64, own, classes, inputs)
  assert refined.shape == (3, 8, 8)
  np.testing.assert_allclose(refined, dense, atol=1e-5)
  # 10 cells: those are the head's, the others the upsampled coarse logits
  sparse = _refined(head, variables, 10, own, classes, inputs)
  up = np.asarray(point_ops.upsample2x(own))
  index, _ = point_ops.uncertain_cells(jnp.asarray(up), 10)
  chosen = np.zeros((3, 64), bool)
  np.put_along_axis(chosen, np.asarray(index), True, axis=1)
  chosen = chosen.reshape(3, 8, 8)
  assert chosen.sum() == 30
  np.testing.assert_allclose(sparse[~chosen], up[~chosen], atol=1e-6)
  np.testing.assert_allclose(sparse[chosen], dense[chosen], atol=1e-5)


@pytest.mark.parametrize(
  'field, value', [('level', 'P7'), ('train_points', 0), ('importance', 1.5), ('image_patch', -1)]
)
def test_bad_point_head_settings_name_the_config_field(field, value):
  with pytest.raises(ValueError, match=f'model.point_head: {field}='):
    PointSpec(enabled=True, **{field: value})
