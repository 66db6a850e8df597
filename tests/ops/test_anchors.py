"""Anchors against a loop-by-loop NumPy reference and their documented conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imask_jax.ops import anchors as anchor_ops


def reference_level_anchors(height, width, stride, size, scales_per_octave, ratios):
  """One box per (y, x, scale, ratio), in that loop order, written out plainly."""
  rows = []
  for y in range(height):
    for x in range(width):
      cy, cx = (y + 0.5) * stride, (x + 0.5) * stride
      for k in range(scales_per_octave):
        side = size * 2.0 ** (k / scales_per_octave)
        for ratio in ratios:
          h, w = side * math.sqrt(ratio), side / math.sqrt(ratio)
          rows.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
  return np.array(rows)


def test_level_anchors_match_reference_with_extreme_ratios():
  ratios = (0.125, 0.25, 1.0, 4.0, 8.0)
  got = anchor_ops.level_anchors((3, 5), 8, 32.0, scales_per_octave=2, aspect_ratios=ratios)
  want = reference_level_anchors(3, 5, 8, 32.0, 2, ratios)
  assert got.shape == (3 * 5 * 10, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_ratio_is_height_over_width_and_area_is_size_squared():
  shapes = anchor_ops.anchor_shapes(64.0, scales_per_octave=1, aspect_ratios=(0.125, 1.0, 8.0))
  np.testing.assert_allclose(shapes[:, 0] / shapes[:, 1], [0.125, 1.0, 8.0])
  np.testing.assert_allclose(shapes[:, 0] * shapes[:, 1], 64.0**2)
  # ratio 8: a tall band, sqrt(8) times the size high and size / sqrt(8) wide.
  np.testing.assert_allclose(shapes[2], [64.0 * math.sqrt(8), 64.0 / math.sqrt(8)])


def test_rows_line_up_with_a_conv_head_reshape():
  height, width, ratios, stride = 4, 3, (0.5, 1.0, 2.0), 16
  boxes = anchor_ops.level_anchors((height, width), stride, 64.0, aspect_ratios=ratios)
  num_a = len(ratios)
  # A head output [H, W, A * k] reshaped to [H * W * A, k]: row r is (y, x, a).
  head = np.arange(height * width * num_a * 2).reshape(height, width, num_a * 2)
  rows = head.reshape(-1, 2)
  for r in range(len(rows)):
    y, x, a = np.unravel_index(r, (height, width, num_a))
    assert rows[r, 0] == head[y, x, 2 * a]
    centre = 0.5 * (boxes[r, :2] + boxes[r, 2:])
    np.testing.assert_allclose(centre, [(y + 0.5) * stride, (x + 0.5) * stride], atol=1e-4)
    h, w = boxes[r, 2:] - boxes[r, :2]
    assert h / w == pytest.approx(ratios[a], rel=1e-5)


def test_multilevel_layout_on_a_non_square_image():
  result = anchor_ops.multilevel_anchors((100, 72), aspect_ratios=(0.25, 1.0, 4.0))
  want_shapes = [(math.ceil(100 / s), math.ceil(72 / s)) for s in (4, 8, 16, 32, 64)]
  assert result.feature_shapes == tuple(want_shapes)
  assert result.num_anchors_per_location == 3
  counts = [h * w * 3 for h, w in want_shapes]
  assert result.level_starts == tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
  assert result.boxes.shape == (sum(counts), 4)
  for level, (stride, size) in enumerate(zip((4, 8, 16, 32, 64), (32, 64, 128, 256, 512))):
    h, w = want_shapes[level]
    want = reference_level_anchors(h, w, stride, size, 1, (0.25, 1.0, 4.0))
    start, stop = result.level_starts[level], result.level_starts[level + 1]
    np.testing.assert_allclose(result.boxes[start:stop], want, rtol=1e-6, atol=1e-3)
    np.testing.assert_array_equal(result.per_level[level], result.boxes[start:stop])
  np.testing.assert_array_equal(np.bincount(result.level_ids()), counts)


def test_explicit_feature_shapes_are_used():
  result = anchor_ops.multilevel_anchors(
    (64, 64), strides=(8, 16), sizes=(16, 32), aspect_ratios=(1.0,), feature_shapes=[(7, 9), (3, 4)]
  )
  assert [len(a) for a in result.per_level] == [63, 12]


@pytest.mark.parametrize(
  'kwargs, message',
  [
    (dict(aspect_ratios=(1.0, 0.0)), 'aspect_ratios'),
    (dict(scales_per_octave=0), 'scales_per_octave'),
    (dict(sizes=(32, 64)), 'one size per stride'),
  ],
)
def test_bad_configuration_is_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    anchor_ops.multilevel_anchors((64, 64), **kwargs)
