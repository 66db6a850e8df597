"""RPN proposals and final detections against plain-Python references written from their
definitions (Detectron2's order):

* `propose`: on each pyramid level the top `pre_nms_topk` anchors by objectness (ties: lower
  index), decoded with the RPN coder (weights 1, scale clamp) and clipped to the image; boxes
  thinner than 1e-3 px dropped; greedy NMS within each level; the best `post_nms_topk` over all
  levels, highest objectness first.
* `select_detections`: every (proposal, class) pair of a valid proposal whose probability is
  strictly above the score threshold; greedy NMS within each class; the best `max_detections`.

Both run under `vmap` over two images, as the model runs them. The greedy NMS below is the
textbook loop (visit by score, ties: lower index; keep unless a kept box of the same group has
IoU > threshold).

Tolerance on boxes: the references decode in float64, the op in float32; coordinates before
clipping stay below 2^10 px here (|dh| <= 1.5 on anchors <= 128 px, or clamped boxes clipped to
the whole image), where a float32 ulp is 2^-13 = 1.2e-4 px, and decode takes a few roundings:
atol = 1e-3 px. Random boxes put no IoU within that of the NMS threshold (checked below).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest

from imask_jax.models.detections import propose, select_detections
from imask_jax.ops import anchors as anchor_ops

IMAGE = (32, 40)
BOX_ATOL = 1e-3


def iou(p, q) -> float:
  inter = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0) * max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
  union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
  return inter / union if union > 0 else 0.0


def greedy(candidates, threshold, max_outputs):
  """candidates: (score, position, group, box); kept ones in visiting order."""
  kept = []
  for c in sorted(candidates, key=lambda c: (-c[0], c[1])):
    if len(kept) == max_outputs:
      break
    if all(iou(c[3], k[3]) <= threshold for k in kept if k[2] == c[2]):
      kept.append(c)
  return kept


def near_threshold(candidates, threshold) -> float:
  """The smallest |IoU - threshold| over same-group pairs: how close a decision came."""
  gaps = [
    abs(iou(a[3], b[3]) - threshold)
    for i, a in enumerate(candidates)
    for b in candidates[i + 1 :]
    if a[2] == b[2]
  ]
  return min(gaps) if gaps else math.inf


def decode_rpn(delta, anchor, height, width):
  """RPN box coder (weights 1) in float64, log-scale clamped at log(1000 / 16), clipped."""
  ah, aw = anchor[2] - anchor[0], anchor[3] - anchor[1]
  cy, cx = anchor[0] + ah / 2 + delta[0] * ah, anchor[1] + aw / 2 + delta[1] * aw
  h = ah * math.exp(min(delta[2], math.log(1000.0 / 16.0)))
  w = aw * math.exp(min(delta[3], math.log(1000.0 / 16.0)))
  box = [cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2]
  return [
    min(max(box[0], 0.0), height),
    min(max(box[1], 0.0), width),
    min(max(box[2], 0.0), height),
    min(max(box[3], 0.0), width),
  ]


def reference_propose(logits, deltas, anchors, pre, post, threshold):
  candidates = []
  starts = anchors.level_starts
  for level in range(anchors.num_levels):
    lo, hi = starts[level], starts[level + 1]
    top = sorted(range(lo, hi), key=lambda i: (-float(logits[i]), i))[: min(pre, hi - lo)]
    for i in top:
      box = decode_rpn([float(v) for v in deltas[i]], [float(v) for v in anchors.boxes[i]], *IMAGE)
      candidates.append((float(logits[i]), len(candidates), level, box))
  sized = [c for c in candidates if c[3][2] - c[3][0] > 1e-3 and c[3][3] - c[3][1] > 1e-3]
  return greedy(sized, threshold, post), sized


def rpn_case(seed):
  anchors = anchor_ops.multilevel_anchors(
    IMAGE, sizes=(8, 16, 32, 64, 128), aspect_ratios=(0.5, 1.0, 2.0)
  )
  rng = np.random.default_rng(seed)
  n = len(anchors.boxes)
  logits = np.round(rng.normal(0, 2, n), 1).astype(np.float32)  # one decimal: many exact ties
  deltas = np.concatenate([rng.normal(0, 0.3, (n, 2)), rng.uniform(-1.5, 1.5, (n, 2))], 1)
  far = rng.random(n) < 0.1
  deltas[far, :2] = rng.choice([-6.0, 6.0], (far.sum(), 2))  # pushed out: zero-size boxes
  huge = rng.random(n) < 0.05
  deltas[huge, 2:] = 20.0  # clamped scale
  return anchors, logits, deltas.astype(np.float32)


# pre_nms_topk 20 against level sizes 240, 60, 18, 6, 3: the cut applies on two levels only.
# NMS leaves 51 proposals of the first image and 46 of the second: the global cut at 48 applies
# to the first only.
PRE, POST, RPN_NMS = 20, 48, 0.6


@pytest.mark.slow
def test_proposals_are_per_level_topk_then_per_level_nms_then_global_topk():
  cases = [rpn_case(seed) for seed in (0, 3)]  # seeds with no IoU near the threshold
  anchors = cases[0][0]
  fn = jax.jit(
    jax.vmap(
      functools.partial(
        propose,
        anchors=anchors,
        image_size=IMAGE,
        pre_nms_topk=PRE,
        post_nms_topk=POST,
        nms_threshold=RPN_NMS,
      )
    )
  )
  boxes, valid = (
    np.asarray(x) for x in fn(np.stack([c[1] for c in cases]), np.stack([c[2] for c in cases]))
  )
  assert [len(a) for a in anchors.per_level] == [240, 60, 18, 6, 3]
  survivors = []
  for b, (_, logits, deltas) in enumerate(cases):
    kept, candidates = reference_propose(logits, deltas, anchors, PRE, POST, RPN_NMS)
    assert near_threshold(candidates, RPN_NMS) > 1e-3
    assert len(candidates) < 20 + 20 + 18 + 6 + 3  # some boxes were pushed out and dropped
    survivors.append(len(reference_propose(logits, deltas, anchors, PRE, 10**6, RPN_NMS)[0]))
    count = len(kept)
    np.testing.assert_array_equal(valid[b], np.arange(POST) < count)
    np.testing.assert_allclose(boxes[b, :count], [k[3] for k in kept], atol=BOX_ATOL)
    np.testing.assert_array_equal(boxes[b, count:], 0.0)
    if b == 0:  # the best 48 of 51 come from several levels
      assert len({k[2] for k in kept}) > 1
  assert survivors[0] > POST > survivors[1]


# --- final detections ----------------------------------------------------------------------------

MAX_DET, SCORE_THRESHOLD, DET_NMS = 10, 0.25, 0.5


def detection_case(seed, n=24, k=3):
  """Boxes around three centres (so NMS has work), probabilities from a coarse grid (ties, and
  scores equal to the threshold, which are not candidates), some invalid proposals."""
  rng = np.random.default_rng(seed)
  centres = np.array([[8.0, 8.0], [20.0, 26.0], [12.0, 30.0]])
  centre = centres[rng.integers(0, 3, (n, k))] + rng.normal(0, 2.5, (n, k, 2))
  size = rng.uniform(4, 12, (n, k, 2))
  boxes = np.concatenate([centre - size / 2, centre + size / 2], -1).astype(np.float32)
  probs = rng.choice([0.1, 0.25, 0.3, 0.5, 0.5, 0.75, 0.9], (n, k)).astype(np.float32)
  probs += rng.choice([0.0, 0.0, 0.01], (n, k)).astype(np.float32)
  valid = rng.random(n) < 0.8
  return boxes, probs, valid


def reference_select(boxes, probs, valid):
  n, k = probs.shape
  candidates = [
    (float(probs[i, c]), i * k + c, c + 1, [float(v) for v in boxes[i, c]])
    for i in range(n)
    for c in range(k)
    if valid[i] and probs[i, c] > np.float32(SCORE_THRESHOLD)
  ]
  return greedy(candidates, DET_NMS, MAX_DET), candidates


@pytest.fixture(scope='module')
def select():
  """select_detections for two images of 24 proposals x 3 classes, compiled once."""
  return jax.jit(
    jax.vmap(
      functools.partial(
        select_detections,
        max_detections=MAX_DET,
        score_threshold=SCORE_THRESHOLD,
        nms_threshold=DET_NMS,
      )
    )
  )


def test_detections_are_per_class_nms_of_valid_scored_pairs_best_first(select):
  cases = [detection_case(seed) for seed in (3, 4)]
  out = [np.asarray(x) for x in select(*(np.stack(parts) for parts in zip(*cases)))]
  saw_full = saw_partial = False
  for b, (boxes, probs, valid) in enumerate(cases):
    assert (probs == np.float32(SCORE_THRESHOLD)).any() and not valid.all()
    kept, candidates = reference_select(boxes, probs, valid)
    assert near_threshold(candidates, DET_NMS) > 1e-4
    count = len(kept)
    saw_full |= count == MAX_DET
    det_boxes, det_scores, det_classes, det_valid = (x[b] for x in out)
    np.testing.assert_array_equal(det_valid, np.arange(MAX_DET) < count)
    np.testing.assert_array_equal(det_boxes[:count], [k[3] for k in kept])
    np.testing.assert_array_equal(det_scores[:count], [k[0] for k in kept])
    np.testing.assert_array_equal(det_classes[:count], [k[2] for k in kept])
    assert not det_boxes[count:].any() and not det_scores[count:].any()
    assert not det_classes[count:].any()
    # Without the output cap, more survive than fit: the cap keeps the best ones.
    saw_partial |= len(greedy(candidates, DET_NMS, 10**6)) > count
  assert saw_full and saw_partial


def test_boxes_of_different_classes_do_not_suppress_each_other(select):
  """Hand-made: one proposal, the same box for both classes, both confident: two detections;
  a second proposal's class-1 box overlapping the first's (IoU 81 / 100) is suppressed, its
  class-2 box elsewhere kept; the other 22 proposals are padding (invalid)."""
  boxes = np.zeros((2, 24, 3, 4), np.float32)
  probs = np.zeros((2, 24, 3), np.float32)
  valid = np.zeros((2, 24), bool)
  boxes[:, 0, 0] = boxes[:, 0, 1] = (0, 0, 10, 10)
  boxes[:, 1, 0] = (0, 0, 9, 9)
  boxes[:, 1, 1] = (20, 20, 30, 30)
  probs[:, :2, :2] = [[0.9, 0.8], [0.7, 0.6]]
  probs[:, 2:] = 0.95  # invalid proposals: never detections
  valid[:, :2] = True
  det_boxes, scores, classes, det_valid = (np.asarray(x)[0] for x in select(boxes, probs, valid))
  np.testing.assert_array_equal(det_valid, np.arange(MAX_DET) < 3)
  np.testing.assert_array_equal(classes[:4], [1, 2, 2, 0])
  np.testing.assert_allclose(scores[:4], [0.9, 0.8, 0.6, 0.0])
  np.testing.assert_array_equal(det_boxes[:3], [[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]])
  assert iou(boxes[0, 0, 0], boxes[0, 1, 0]) == pytest.approx(0.81)
