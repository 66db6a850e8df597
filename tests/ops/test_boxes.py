"""Box ops against plain NumPy references, with hypothesis properties."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from imask_jax.ops import boxes as box_ops

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def reference_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      ih = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
      iw = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
      inter = ih * iw
      area_p = max(p[2] - p[0], 0.0) * max(p[3] - p[1], 0.0)
      area_q = max(q[2] - q[0], 0.0) * max(q[3] - q[1], 0.0)
      union = area_p + area_q - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def reference_encode(box, anchor, weights):
  ah, aw = anchor[2] - anchor[0], anchor[3] - anchor[1]
  bh, bw = box[2] - box[0], box[3] - box[1]
  acy, acx = anchor[0] + ah / 2, anchor[1] + aw / 2
  bcy, bcx = box[0] + bh / 2, box[1] + bw / 2
  return [
    weights[0] * (bcy - acy) / ah,
    weights[1] * (bcx - acx) / aw,
    weights[2] * math.log(bh / ah),
    weights[3] * math.log(bw / aw),
  ]


def boxes_from(corner, size):
  return np.concatenate([corner, corner + size], axis=-1).astype(np.float32)


_iou = jax.jit(box_ops.iou_matrix)
_roundtrip = jax.jit(lambda b, a: box_ops.decode(box_ops.encode(b, a, WEIGHTS), a, WEIGHTS))

coords = st.floats(0.0, 100.0, width=32)
# Sides are exactly 0 or at least 2**-10 px: the float32 product of two smaller sides underflows
# (XLA on CPU also flushes subnormals to zero), so such a box has no area in float32 while the
# float64 reference still sees one. No detector box is a thousandth of a pixel wide.
sides = st.one_of(st.just(0.0), st.floats(2.0**-10, 30.0, width=32))
# 12 boxes with corners in [0, 100] and sides in {0} or [2**-10, 30] (zero-area boxes included).
box_sets = st.tuples(
  hnp.arrays(np.float32, (12, 2), elements=coords), hnp.arrays(np.float32, (12, 2), elements=sides)
)


@settings(max_examples=25, deadline=None)
@given(box_sets)
def test_iou_is_symmetric_bounded_and_matches_reference(corner_size):
  b = boxes_from(*corner_size)
  iou = np.asarray(_iou(b, b))
  assert np.all(np.isfinite(iou)) and np.all((iou >= 0) & (iou <= 1))
  np.testing.assert_allclose(iou, iou.T, atol=1e-6)
  np.testing.assert_allclose(
    iou, reference_iou(b.astype(np.float64), b.astype(np.float64)), atol=1e-5
  )
  has_area = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  np.testing.assert_allclose(np.diag(iou)[has_area], 1.0, atol=1e-6)


def test_zero_area_and_inverted_boxes_give_zero_not_nan():
  a = np.array([[5, 5, 5, 5], [0, 0, 10, 10], [8, 8, 2, 2]], np.float32)
  b = np.array([[5, 5, 5, 5], [3, 3, 3, 9], [0, 0, 10, 10]], np.float32)
  iou = np.asarray(_iou(a, b))
  want = reference_iou(a, b)
  np.testing.assert_allclose(iou, want, atol=1e-7)
  assert iou[0, 0] == 0.0 and iou[1, 2] == 1.0 and np.all(iou[2] == 0.0)
  np.testing.assert_array_equal(np.asarray(box_ops.area(a)), [0.0, 100.0, 0.0])


@settings(max_examples=25, deadline=None)
@given(box_sets, box_sets)
def test_decode_inverts_encode(box_cs, anchor_cs):
  # Sides >= 1 px keep every log-ratio well inside the decode clamp (at most log(31)).
  b = boxes_from(box_cs[0], box_cs[1] + 1.0)
  a = boxes_from(anchor_cs[0], anchor_cs[1] + 1.0)
  np.testing.assert_allclose(np.asarray(_roundtrip(b, a)), b, rtol=1e-5, atol=2e-3)


def test_encode_matches_reference():
  rng = np.random.default_rng(0)
  b = boxes_from(rng.uniform(0, 50, (20, 2)), rng.uniform(1, 40, (20, 2)))
  a = boxes_from(rng.uniform(0, 50, (20, 2)), rng.uniform(1, 40, (20, 2)))
  for weights in (WEIGHTS, (1.0, 1.0, 1.0, 1.0)):
    want = [
      reference_encode(p.astype(np.float64), q.astype(np.float64), weights) for p, q in zip(b, a)
    ]
    np.testing.assert_allclose(
      np.asarray(box_ops.encode(b, a, weights)), want, rtol=1e-5, atol=1e-4
    )


def test_decode_clamps_log_scale_before_exp():
  anchor = np.array([[0, 0, 16, 16]], np.float32)
  deltas = np.array([[0, 0, 1e4, 1e4]], np.float32)  # exp(2000) would overflow
  out = np.asarray(jax.jit(box_ops.decode)(deltas, anchor))
  side = 16.0 * 1000.0 / 16.0
  np.testing.assert_allclose(
    out, [[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]], rtol=1e-5
  )


def test_encode_of_degenerate_box_is_finite():
  out = np.asarray(
    box_ops.encode(np.zeros((1, 4), np.float32), np.array([[0, 0, 8, 8]], np.float32))
  )
  assert np.all(np.isfinite(out))


def test_clip_with_static_and_per_image_sizes_under_vmap():
  boxes = np.array(
    [[[-5, -3, 50, 70], [10, 20, 30, 40]], [[-1, 2, 90, 90], [5, -8, 6, 200]]], np.float32
  )
  hw = np.array([[40, 64], [80, 100]], np.float32)
  want = boxes.copy()
  for i in range(2):
    want[i, :, [0, 2]] = np.clip(boxes[i, :, [0, 2]], 0, hw[i, 0])
    want[i, :, [1, 3]] = np.clip(boxes[i, :, [1, 3]], 0, hw[i, 1])
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(box_ops.clip))(boxes, hw)), want)
  np.testing.assert_array_equal(np.asarray(box_ops.clip(boxes, hw)), want)
  np.testing.assert_array_equal(np.asarray(box_ops.clip(boxes[0], (40, 64))), want[0])


def test_batched_under_jit_and_vmap_equals_per_image():
  rng = np.random.default_rng(1)
  a = boxes_from(rng.uniform(0, 50, (3, 7, 2)), rng.uniform(1, 40, (3, 7, 2)))
  b = boxes_from(rng.uniform(0, 50, (3, 5, 2)), rng.uniform(1, 40, (3, 5, 2)))
  iou = np.asarray(jax.jit(jax.vmap(box_ops.iou_matrix))(a, b))
  for i in range(3):
    np.testing.assert_allclose(iou[i], reference_iou(a[i], b[i]), atol=1e-5)
  deltas = jax.jit(jax.vmap(box_ops.encode))(a[:, :5], b)
  np.testing.assert_allclose(
    np.asarray(jax.vmap(box_ops.decode)(deltas, b)), a[:, :5], rtol=1e-5, atol=1e-3
  )


def test_bad_shapes_and_weights_are_named():
  with pytest.raises(ValueError, match=r'iou_matrix\(a\).*\(3, 5\)'):
    box_ops.iou_matrix(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match='weights'):
    box_ops.encode(jnp.zeros((2, 4)), jnp.ones((2, 4)), weights=(1.0, 1.0, 0.0, 1.0))
