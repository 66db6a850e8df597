"""Matching, balanced sampling and RPN/ROI targets against plain NumPy references."""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from imask_jax.ops import anchors as anchor_ops
from imask_jax.ops import sampling


def reference_iou(a, b):
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      inter = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0) * max(
        min(p[3], q[3]) - max(p[1], q[1]), 0.0
      )
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
      out[i, j] = inter / union if union > 0 else 0.0
  return out


def reference_match(iou, gt_valid, high, low, allow_low_quality):
  """Returns (gt_index, labels) computed row by row and column by column."""
  n, g = iou.shape
  valid_cols = [j for j in range(g) if gt_valid[j]]
  gt_index = np.full(n, -1)
  labels = np.zeros(n, int)
  for i in range(n):
    best = -np.inf
    for j in valid_cols:  # strict > keeps the lowest index on ties
      if iou[i, j] > best:
        best, gt_index[i] = iou[i, j], j
    labels[i] = 1 if best >= high else (0 if best < low else -1)
  if allow_low_quality:
    for j in valid_cols:
      column_best = max(iou[i, j] for i in range(n))
      for i in range(n):
        if column_best > 0 and iou[i, j] == column_best:
          labels[i] = 1
  return gt_index, labels


def reference_encode(box, anchor, weights):
  ah, aw = anchor[2] - anchor[0], anchor[3] - anchor[1]
  bh, bw = box[2] - box[0], box[3] - box[1]
  return [
    weights[0] * ((box[0] + bh / 2) - (anchor[0] + ah / 2)) / ah,
    weights[1] * ((box[1] + bw / 2) - (anchor[1] + aw / 2)) / aw,
    weights[2] * math.log(bh / ah),
    weights[3] * math.log(bw / aw),
  ]


# ------------------------------------------------------------------------------- match


@functools.cache
def jitted_match(high, low, allow_low_quality):
  return jax.jit(
    functools.partial(sampling.match, high=high, low=low, allow_low_quality=allow_low_quality)
  )


MATCH_MODES = [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.5, True)]


@settings(max_examples=40, deadline=None)
@given(
  iou=hnp.arrays(
    np.float32, (16, 4), elements=st.sampled_from([0.0, 0.1, 0.3, 0.4, 0.5, 0.7, 0.9, 1.0])
  ),
  gt_valid=hnp.arrays(np.bool_, (4,), elements=st.booleans()),
  mode=st.sampled_from(MATCH_MODES),
)
def test_match_equals_reference_and_never_matches_padding(iou, gt_valid, mode):
  got = jitted_match(*mode)(iou, gt_valid)
  gt_index, labels = np.asarray(got.gt_index), np.asarray(got.labels)
  want_index, want_labels = reference_match(iou, gt_valid, *mode)
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(gt_index, want_index)
  if gt_valid.any():
    assert np.all(gt_valid[gt_index])
  else:
    assert np.all(gt_index == -1) and np.all(labels == 0)


def test_low_quality_match_rescues_a_gt_below_the_positive_threshold():
  iou = np.array([[0.4, 0.0], [0.4, 0.1], [0.2, 0.8], [0.0, 0.0]], np.float32)
  plain = sampling.match(iou, np.array([True, True]), high=0.7, low=0.3, allow_low_quality=False)
  rescued = sampling.match(iou, np.array([True, True]), high=0.7, low=0.3, allow_low_quality=True)
  np.testing.assert_array_equal(np.asarray(plain.labels), [-1, -1, 1, 0])
  np.testing.assert_array_equal(np.asarray(rescued.labels), [1, 1, 1, 0])  # ties included
  np.testing.assert_array_equal(np.asarray(rescued.gt_index), [0, 0, 1, 0])


# ---------------------------------------------------------------------- sample_balanced


@functools.cache
def jitted_sample(num_samples, positive_fraction):
  return jax.jit(
    functools.partial(
      sampling.sample_balanced, num_samples=num_samples, positive_fraction=positive_fraction
    )
  )


@settings(max_examples=40, deadline=None)
@given(
  labels=hnp.arrays(np.int32, (40,), elements=st.sampled_from([-1, 0, 0, 1])),
  config=st.sampled_from([(16, 0.25), (16, 0.5), (7, 0.3), (64, 0.5), (16, 1.0), (16, 0.0)]),
  seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_sampled_counts_are_exact(labels, config, seed):
  num_samples, fraction = config
  got = jitted_sample(*config)(labels, key=jax.random.key(seed))
  indices, is_pos, valid = (np.asarray(v) for v in got)
  want_pos = min(int(np.sum(labels == 1)), math.floor(num_samples * fraction + 0.5))
  want_neg = min(int(np.sum(labels == 0)), num_samples - want_pos)
  assert indices.shape == is_pos.shape == valid.shape == (num_samples,)
  assert int(is_pos.sum()) == want_pos and int(valid.sum()) == want_pos + want_neg
  # Positives first, then negatives, then padding.
  np.testing.assert_array_equal(is_pos, np.arange(num_samples) < want_pos)
  np.testing.assert_array_equal(valid, np.arange(num_samples) < want_pos + want_neg)
  assert np.all(labels[indices[is_pos]] == 1)
  assert np.all(labels[indices[valid & ~is_pos]] == 0)
  assert len(set(indices[valid].tolist())) == int(valid.sum())
  assert np.all(indices[~valid] == -1)


def test_sampling_is_uniform_over_keys():
  labels = np.array([1] * 10 + [0] * 50 + [-1] * 20, np.int32)
  keys = jax.random.split(jax.random.key(0), 400)
  fn = jax.jit(
    jax.vmap(
      functools.partial(sampling.sample_balanced, labels, num_samples=8, positive_fraction=0.5)
    )
  )
  out = fn(key=keys)
  picks = np.bincount(np.asarray(out.indices).ravel(), minlength=80)
  # 4 of 10 positives per draw: 160 expected each (sd ~10); 4 of 50 negatives: 32 (sd ~5.4).
  assert np.all((picks[:10] > 110) & (picks[:10] < 210))
  assert np.all((picks[10:60] > 8) & (picks[10:60] < 60))
  assert np.all(picks[60:] == 0)


@pytest.mark.parametrize('fraction', [0.25, 0.5, 1.0])
def test_hard_negatives_are_the_first_negative_rows_and_the_rest_uniform(fraction):
  # Rows in the callers' order (proposals by objectness), the hardest first.
  # Two positives, fewer than the quota of 6: the negatives fill 22 slots, not 18.
  rng = np.random.default_rng(7)
  labels = rng.choice(np.array([0, 0, 0, -1], np.int32), 120)
  labels[:3] = (1, -1, 1)
  num_samples, positive_fraction = 24, 0.25
  keys = jax.random.split(jax.random.key(3), 300)
  fn = jax.jit(
    jax.vmap(
      functools.partial(
        sampling.sample_balanced,
        labels,
        num_samples=num_samples,
        positive_fraction=positive_fraction,
        hard_negative_fraction=fraction,
      )
    )
  )
  out = fn(key=keys)
  negative_rows = np.flatnonzero(labels == 0)
  num_pos = min(int(np.sum(labels == 1)), math.floor(num_samples * positive_fraction + 0.5))
  num_neg = min(len(negative_rows), num_samples - num_pos)
  num_hard = math.floor(fraction * num_neg + 0.5)
  hard, rest = set(negative_rows[:num_hard].tolist()), negative_rows[num_hard:]
  picks = np.zeros(len(labels), int)
  for indices, is_pos, valid in zip(*(np.asarray(v) for v in out)):
    negatives = indices[valid & ~is_pos]
    assert len(negatives) == num_neg and np.all(labels[negatives] == 0)
    # Every draw holds all the hard rows, in order, in the first negative slots.
    np.testing.assert_array_equal(negatives[:num_hard], negative_rows[:num_hard])
    assert not hard & set(negatives[num_hard:].tolist())
    picks[negatives[num_hard:]] += 1
  if len(rest) and num_neg > num_hard:
    # The others uniform: each expected 300 * (num_neg - num_hard) / len(rest) times.
    expected = 300 * (num_neg - num_hard) / len(rest)
    assert np.all(np.abs(picks[rest] - expected) < 5 * np.sqrt(expected) + 2)


def test_no_hard_negatives_draws_exactly_as_before():
  labels = np.array([1] * 10 + [0] * 50 + [-1] * 20, np.int32)
  key = jax.random.key(11)
  plain = sampling.sample_balanced(labels, num_samples=16, positive_fraction=0.25, key=key)
  zero = sampling.sample_balanced(
    labels, num_samples=16, positive_fraction=0.25, key=key, hard_negative_fraction=0.0
  )
  np.testing.assert_array_equal(np.asarray(plain.indices), np.asarray(zero.indices))
  # The draw is the top-k of one uniform key per row: a NumPy rerun of that rule.
  priority = np.asarray(jax.random.uniform(key, (80,)))
  want_neg = np.argsort(-np.where(labels == 0, priority, -1.0), kind='stable')[:12]
  np.testing.assert_array_equal(np.asarray(plain.indices)[4:], want_neg)


# ---------------------------------------------------------------------------- targets


def rpn_case():
  anchors = anchor_ops.multilevel_anchors(
    (64, 64), strides=(8, 16), sizes=(16, 32), aspect_ratios=(0.25, 1.0, 4.0)
  ).boxes
  gt_boxes = np.array(
    [
      [10, 8, 40, 20],  # femur-like blob
      [44, 4, 50, 60],  # thin horizontal cartilage band (ratio ~0.1)
      [0, 0, 64, 64],  # padding slot: would match almost everything
      [20, 20, 36, 36],
    ],
    np.float32,
  )
  gt_valid = np.array([True, True, False, False])
  return anchors, gt_boxes, gt_valid


def test_rpn_targets_follow_reference_labels_and_encoding():
  anchors, gt_boxes, gt_valid = rpn_case()
  inside = np.all((anchors >= 0) & (anchors <= 64), axis=1)
  fn = jax.jit(functools.partial(sampling.rpn_targets, num_samples=32))
  out = fn(anchors, gt_boxes, gt_valid, jax.random.key(1), anchor_valid=inside)
  objectness, weight, targets, box_weight, gt_index = (np.asarray(v) for v in out)

  iou = reference_iou(anchors.astype(np.float64), gt_boxes.astype(np.float64))
  iou[~inside] = -1.0
  want_index, labels = reference_match(iou, gt_valid, 0.7, 0.3, True)
  labels[~inside] = -1
  num_pos = min(int((labels == 1).sum()), 16)
  assert num_pos >= 2  # each valid gt gets at least its best anchor
  assert int(objectness.sum()) == num_pos and int(box_weight.sum()) == num_pos
  assert int(weight.sum()) == min(32, num_pos + int((labels == 0).sum()))
  assert np.all(labels[objectness == 1] == 1) and np.all(labels[weight > 0] >= 0)
  assert np.all(weight[~inside] == 0)
  positive = objectness == 1
  np.testing.assert_array_equal(gt_index[positive], want_index[positive])
  assert np.all(gt_valid[gt_index[positive]]) and np.all(gt_index[~positive] == -1)
  want_targets = [
    reference_encode(gt_boxes[g].astype(np.float64), a.astype(np.float64), (1, 1, 1, 1))
    for g, a in zip(gt_index[positive], anchors[positive])
  ]
  np.testing.assert_allclose(targets[positive], want_targets, rtol=1e-4, atol=1e-5)
  assert np.all(targets[~positive] == 0)


@pytest.mark.slow
def test_rpn_targets_under_vmap_equal_per_image():
  anchors, gt_boxes, gt_valid = rpn_case()
  gt_batch = np.stack([gt_boxes, gt_boxes[::-1]])
  valid_batch = np.stack([gt_valid, gt_valid[::-1]])
  keys = jax.random.split(jax.random.key(2), 2)
  fn = functools.partial(sampling.rpn_targets, num_samples=32)
  batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, 0)))(anchors, gt_batch, valid_batch, keys)
  single_fn = jax.jit(fn)
  for i in range(2):
    single = single_fn(anchors, gt_batch[i], valid_batch[i], keys[i])
    for got, want in zip(batched, single):
      np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-6)


def roi_case(seed):
  rng = np.random.default_rng(seed)
  corner = rng.uniform(0, 50, (30, 2))
  proposals = np.concatenate([corner, corner + rng.uniform(4, 30, (30, 2))], 1)
  proposal_valid = rng.uniform(size=30) < 0.8
  gt_boxes = np.array([[10, 10, 30, 30], [35, 5, 45, 60], [0, 0, 80, 80]])
  gt_classes = np.array([2, 4, 3], np.int32)
  gt_valid = np.array([True, True, False])
  return (
    proposals.astype(np.float32),
    proposal_valid,
    gt_boxes.astype(np.float32),
    gt_classes,
    gt_valid,
  )


@pytest.mark.parametrize('num_samples', [16, 512])
def test_roi_targets_follow_reference(num_samples):
  proposals, proposal_valid, gt_boxes, gt_classes, gt_valid = roi_case(0)
  fn = jax.jit(functools.partial(sampling.roi_targets, num_samples=num_samples))
  out = fn(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, jax.random.key(3))

  candidates = np.concatenate([proposals, gt_boxes]).astype(np.float64)
  candidate_valid = np.concatenate([proposal_valid, gt_valid])
  want_index, labels = reference_match(
    reference_iou(candidates, gt_boxes), gt_valid, 0.5, 0.5, False
  )
  labels[~candidate_valid] = -1
  want_pos = min(int((labels == 1).sum()), round(num_samples * 0.25))
  want_neg = min(int((labels == 0).sum()), num_samples - want_pos)
  valid, is_pos = np.asarray(out.valid), np.asarray(out.is_positive)
  source = np.asarray(out.source_index)
  assert int(is_pos.sum()) == want_pos and int(valid.sum()) == want_pos + want_neg
  assert np.all(labels[source[is_pos]] == 1) and np.all(labels[source[valid & ~is_pos]] == 0)
  np.testing.assert_array_equal(np.asarray(out.rois)[valid], candidates[source[valid]])
  assert np.all(np.asarray(out.rois)[~valid] == 0)
  gt_index = np.asarray(out.gt_index)
  np.testing.assert_array_equal(gt_index[is_pos], want_index[source[is_pos]])
  assert np.all(gt_index[~is_pos] == -1) and np.all(gt_valid[gt_index[is_pos]])
  classes = np.asarray(out.classes)
  np.testing.assert_array_equal(classes[is_pos], gt_classes[gt_index[is_pos]])
  assert np.all(classes[~is_pos] == 0)
  targets = np.asarray(out.box_targets)
  want_targets = [
    reference_encode(gt_boxes[g].astype(np.float64), candidates[s], (10, 10, 5, 5))
    for g, s in zip(gt_index[is_pos], source[is_pos])
  ]
  np.testing.assert_allclose(
    targets[is_pos], np.reshape(want_targets, (-1, 4)), rtol=1e-4, atol=1e-4
  )
  assert np.all(targets[~is_pos] == 0)


def test_roi_targets_append_ground_truth():
  proposals, _, gt_boxes, gt_classes, gt_valid = roi_case(1)
  no_proposals = np.zeros(len(proposals), bool)
  fn = jax.jit(functools.partial(sampling.roi_targets, num_samples=8))
  out = fn(proposals, no_proposals, gt_boxes, gt_classes, gt_valid, jax.random.key(4))
  # Only the two valid gt boxes remain to sample, both perfect positives.
  assert int(np.asarray(out.valid).sum()) == 2 and int(np.asarray(out.is_positive).sum()) == 2
  order = np.argsort(np.asarray(out.gt_index)[:2])
  np.testing.assert_array_equal(np.asarray(out.rois)[:2][order], gt_boxes[:2])
  np.testing.assert_array_equal(np.asarray(out.classes)[:2][order], [2, 4])
  np.testing.assert_allclose(np.asarray(out.box_targets)[:2], 0.0, atol=1e-6)


def test_roi_targets_under_vmap_equal_per_image():
  cases = [roi_case(s) for s in (5, 6)]
  batch = [np.stack(parts) for parts in zip(*cases)]
  keys = jax.random.split(jax.random.key(5), 2)
  fn = functools.partial(sampling.roi_targets, num_samples=24)
  batched = jax.jit(jax.vmap(fn))(*batch, keys)
  single_fn = jax.jit(fn)
  for i in range(2):
    single = single_fn(*cases[i], keys[i])
    for got, want in zip(batched, single):
      np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-6)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match=r'gt_boxes must be \[G, 4\] with G >= 1'):
    sampling.rpn_targets(
      np.zeros((5, 4)), np.zeros((0, 4)), np.zeros((0,), bool), jax.random.key(0)
    )
  with pytest.raises(ValueError, match='low <= high'):
    sampling.match(np.zeros((3, 2)), np.ones(2, bool), high=0.3, low=0.7, allow_low_quality=False)
  with pytest.raises(ValueError, match='positive_fraction'):
    sampling.sample_balanced(
      np.zeros(4, np.int32), num_samples=2, positive_fraction=1.5, key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match='hard_negative_fraction must be in'):
    sampling.sample_balanced(
      np.zeros(4, np.int32),
      num_samples=2,
      positive_fraction=0.5,
      key=jax.random.key(0),
      hard_negative_fraction=-0.1,
    )
