"""NMS against a plain Python greedy NMS, with hypothesis properties."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from imask_jax.ops import nms as nms_ops

N, M = 20, 12  # candidates and output slots in the property tests


def pair_iou(p, q):
  """IoU in float32, the precision the op computes in."""
  p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
  inter = max(min(p[2], q[2]) - max(p[0], q[0]), np.float32(0)) * max(
    min(p[3], q[3]) - max(p[1], q[1]), np.float32(0)
  )
  union = ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])) - inter
  return inter / union if union > 0 else np.float32(0)


def greedy_nms(
  boxes, scores, iou_threshold, max_outputs, score_threshold=-np.inf, valid=None, classes=None
):
  """Textbook greedy NMS: best score first (ties: lower index), one box at a time."""
  candidates = [
    i for i in range(len(scores)) if scores[i] > score_threshold and (valid is None or valid[i])
  ]
  candidates.sort(key=lambda i: (-scores[i], i))
  kept = []
  for i in candidates:
    if len(kept) == max_outputs:
      break
    if all(
      pair_iou(boxes[i], boxes[k]) <= iou_threshold
      for k in kept
      if classes is None or classes[k] == classes[i]
    ):
      kept.append(i)
  return kept


def random_boxes(rng, n, extent=40.0, max_side=20.0):
  corner = rng.uniform(0, extent, (n, 2))
  side = rng.uniform(1, max_side, (n, 2))
  return np.concatenate([corner, corner + side], 1).astype(np.float32)


@functools.cache
def jitted(method, tile_size, max_outputs, batched):
  """One compile per configuration; thresholds are traced so examples reuse it."""

  def run(boxes, scores, classes, valid, iou_threshold, score_threshold):
    kwargs = dict(
      iou_threshold=iou_threshold,
      max_outputs=max_outputs,
      score_threshold=score_threshold,
      valid=valid,
      method=method,
      tile_size=tile_size,
    )
    if batched:
      return nms_ops.batched_nms(boxes, scores, classes, **kwargs)
    return nms_ops.nms(boxes, scores, **kwargs)

  return jax.jit(run)


# Integer corners and sides make exact ties in IoU and score likely; small side ranges make
# chains of overlapping boxes. Scores come from a few values so ties in score are common.
candidate_sets = st.fixed_dictionaries(
  {
    'corner': hnp.arrays(np.int32, (N, 2), elements=st.integers(0, 24)),
    'side': hnp.arrays(np.int32, (N, 2), elements=st.integers(0, 16)),
    'scores': hnp.arrays(np.float32, (N,), elements=st.sampled_from([0.0, 0.25, 0.5, 1.0])),
    'valid': hnp.arrays(np.bool_, (N,), elements=st.booleans()),
    'classes': hnp.arrays(np.int32, (N,), elements=st.integers(0, 2)),
    'iou_threshold': st.sampled_from([0.0, 0.3, 0.5, 0.7]),
    'score_threshold': st.sampled_from([-np.inf, 0.0]),
    'method': st.sampled_from([('tiled', 8), ('tiled', 64), ('sequential', 1)]),
  }
)


def unpack(case):
  boxes = np.concatenate([case['corner'], case['corner'] + case['side']], 1).astype(np.float32)
  return boxes, case['scores'], case['classes'], case['valid']


def run_case(case, batched):
  boxes, scores, classes, valid = unpack(case)
  fn = jitted(*case['method'], M, batched)
  indices, count = fn(boxes, scores, classes, valid, case['iou_threshold'], case['score_threshold'])
  indices, count = np.asarray(indices), int(count)
  assert indices.shape == (M,) and indices.dtype == np.int32
  assert np.all(indices[count:] == nms_ops.PAD_INDEX) and np.all(indices[:count] >= 0)
  return boxes, scores, classes, valid, list(indices[:count])


@settings(max_examples=60, deadline=None)
@given(candidate_sets)
def test_nms_equals_greedy_and_explains_every_suppression(case):
  boxes, scores, _, valid, kept = run_case(case, batched=False)
  thr, score_thr = case['iou_threshold'], case['score_threshold']
  assert kept == greedy_nms(boxes, scores, thr, M, score_thr, valid)
  for a in range(len(kept)):
    for b in range(a + 1, len(kept)):
      assert pair_iou(boxes[kept[a]], boxes[kept[b]]) <= thr
  # Every candidate ranked above the last survivor and not kept overlaps a better survivor.
  rank = sorted(range(N), key=lambda i: (-scores[i], i))
  candidates = [i for i in rank if valid[i] and scores[i] > score_thr]
  if kept:
    last = candidates.index(kept[-1])
    visited = candidates if len(kept) < M else candidates[: last + 1]
    for i in visited:
      if i not in kept:
        better = [k for k in kept if candidates.index(k) < candidates.index(i)]
        assert any(pair_iou(boxes[i], boxes[k]) > thr for k in better)
  else:
    assert not candidates


@settings(max_examples=40, deadline=None)
@given(candidate_sets)
def test_batched_nms_equals_per_class_greedy(case):
  boxes, scores, classes, valid, kept = run_case(case, batched=True)
  want = greedy_nms(
    boxes, scores, case['iou_threshold'], M, case['score_threshold'], valid, classes
  )
  assert kept == want


def test_boxes_of_different_classes_never_suppress_each_other():
  boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (6, 1))
  scores = np.linspace(1, 0.5, 6).astype(np.float32)
  classes = np.array([0, 1, 2, 0, 1, 2], np.int32)
  indices, count = nms_ops.batched_nms(boxes, scores, classes, iou_threshold=0.5, max_outputs=6)
  assert int(count) == 3
  np.testing.assert_array_equal(np.asarray(indices), [0, 1, 2, -1, -1, -1])


@pytest.mark.parametrize('method', nms_ops.METHODS)
def test_ties_keep_the_lowest_index(method):
  boxes = np.array([[0, 0, 10, 10]] * 3 + [[50, 50, 60, 60]] * 2, np.float32)
  scores = np.array([0.5, 0.5, 0.5, 0.5, 0.9], np.float32)
  indices, count = jax.jit(
    functools.partial(nms_ops.nms, iou_threshold=0.5, max_outputs=4, method=method)
  )(boxes, scores)
  np.testing.assert_array_equal(np.asarray(indices), [4, 0, -1, -1])
  assert int(count) == 2


def test_score_threshold_valid_mask_and_padding():
  boxes = random_boxes(np.random.default_rng(2), 8, extent=200.0, max_side=5.0)  # disjoint
  scores = np.array([0.9, 0.1, 0.8, 0.05, 0.7, 0.6, -np.inf, np.nan], np.float32)
  valid = np.array([1, 1, 1, 1, 0, 1, 1, 1], bool)
  indices, count = nms_ops.nms(
    boxes, scores, iou_threshold=0.5, max_outputs=6, score_threshold=0.08, valid=valid
  )
  np.testing.assert_array_equal(np.asarray(indices), [0, 2, 5, 1, -1, -1])
  assert int(count) == 4
  indices, count = nms_ops.nms(boxes, scores, iou_threshold=0.5, max_outputs=6)
  assert int(count) == 6  # default threshold -inf: only -inf and NaN scores drop out
  assert set(np.asarray(indices).tolist()) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize('method', nms_ops.METHODS)
@pytest.mark.slow
def test_many_candidates_match_greedy(method):
  # 600 clustered boxes over several tiles, stopping at max_outputs.
  rng = np.random.default_rng(3)
  boxes = random_boxes(rng, 600, extent=120.0, max_side=40.0)
  scores = rng.uniform(size=600).astype(np.float32)
  for max_outputs in (50, 600):
    indices, count = jax.jit(
      functools.partial(nms_ops.nms, iou_threshold=0.6, max_outputs=max_outputs, method=method)
    )(boxes, scores)
    want = greedy_nms(boxes, scores, 0.6, max_outputs)
    assert list(np.asarray(indices)[: int(count)]) == want


def test_vmap_over_batch_equals_per_image():
  rng = np.random.default_rng(4)
  boxes = np.stack([random_boxes(rng, 40) for _ in range(3)])
  scores = rng.uniform(size=(3, 40)).astype(np.float32)
  valid = rng.uniform(size=(3, 40)) < 0.8
  fn = jax.jit(
    jax.vmap(functools.partial(nms_ops.nms, iou_threshold=0.5, max_outputs=16, tile_size=16))
  )
  indices, counts = fn(boxes, scores, valid=valid)
  for i in range(3):
    want = greedy_nms(boxes[i], scores[i], 0.5, 16, valid=valid[i])
    assert int(counts[i]) == len(want)
    assert list(np.asarray(indices[i])) == want + [-1] * (16 - len(want))


def test_empty_input_and_bad_arguments():
  indices, count = nms_ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), iou_threshold=0.5, max_outputs=3)
  np.testing.assert_array_equal(np.asarray(indices), [-1, -1, -1])
  assert int(count) == 0
  with pytest.raises(ValueError, match=r'scores must be \[N\] = \[4\]'):
    nms_ops.nms(jnp.zeros((4, 4)), jnp.zeros((5,)), iou_threshold=0.5, max_outputs=3)
  with pytest.raises(ValueError, match='method'):
    nms_ops.nms(jnp.zeros((4, 4)), jnp.zeros((4,)), iou_threshold=0.5, max_outputs=3, method='fast')
  with pytest.raises(ValueError, match='classes must be integers'):
    nms_ops.batched_nms(
      jnp.zeros((4, 4)), jnp.zeros((4,)), jnp.zeros((4,)), iou_threshold=0.5, max_outputs=3
    )
