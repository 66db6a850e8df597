"""Validation Dice, the number that picks the best checkpoint (train.slice_dice), against a
hand-worked pooled Dice.

The detection function is replaced by a lookup of known label maps (the image's first pixel
holds the slice's row in the lookup), so the test exercises everything slice_dice does around
the model: truth label maps from padded instances, padding examples left out, pixel counts
pooled over every slice before the ratio, the rule for a class absent from both truth and
prediction, and the overlay example.
"""

from __future__ import annotations

import numpy as np
import pytest

from imask_jax import parallel
from imask_jax.training import train

H = W = 6
M = 3  # instance slots


def _slice(instances, pred):
  """One example: instances [(class, (r0, r1, c0, c1)) or None for a padded slot], the
  predicted label map."""
  classes = np.zeros(M, np.int32)
  masks = np.zeros((M, H, W), np.uint8)
  valid = np.zeros(M, bool)
  for m, inst in enumerate(instances):
    if inst is None:  # a padded slot that still carries a mask and class: must not count
      classes[m], masks[m, :, :] = 2, 1
      continue
    cls, (r0, r1, c0, c1) = inst
    classes[m], valid[m] = cls, True
    masks[m, r0:r1, c0:c1] = 1
  return classes, masks, valid, np.asarray(pred, np.int32)


def _pred(*boxes):
  label = np.zeros((H, W), np.int32)
  for cls, (r0, r1, c0, c1) in boxes:
    label[r0:r1, c0:c1] = cls
  return label


# Classes: 1 found (partly), 2 in the truth only, 3 predicted only, 4 absent from both.
SLICES = [
  # truth class 1 rows 0-2 x cols 0-3 (12 px); prediction class 1 rows 1-3 x cols 0-3
  # (12 px, 8 shared)
  _slice([(1, (0, 3, 0, 4)), None], _pred((1, (1, 4, 0, 4)))),
  # truth class 2 (4 px), missed; class 3 predicted where nothing is (2 px)
  _slice([(2, (4, 6, 4, 6))], _pred((3, (0, 1, 0, 2)))),
  # two class-1 instances (6 + 4 px) and a later class-2 instance painted over one pixel of
  # the first (the later slot wins): class 1 = 9 px, class 2 = 1 + 3 px; prediction: the
  # class-1 pixels exactly
  _slice(
    [(1, (0, 2, 0, 3)), (1, (4, 6, 0, 2)), (2, (1, 2, 2, 6))],
    _pred((1, (0, 2, 0, 3)), (1, (4, 6, 0, 2)), (0, (1, 2, 2, 3))),
  ),
]
# A padding example: everything would count if example_valid were ignored.
PADDING = _slice([(4, (0, 6, 0, 6))], _pred((4, (0, 6, 0, 6))))

# Pooled by hand over the three real slices:
#   class 1: truth 12 + 9 = 21, predicted 12 + 9 = 21, shared 8 + 9 = 17 -> 34 / 42
#   class 2: truth 4 + 4 = 8, predicted 0 -> 0;  class 3: truth 0, predicted 2 -> 0
#   class 4: absent from truth and prediction everywhere -> NaN: absent, never a perfect 1
HAND = [34 / 42, 0.0, 0.0, np.nan]


def _dataset(batch_size=2):
  """Batches [1 device, batch_size, ...] of SLICES then PADDING, image[0, 0, 0] = lookup row."""
  rows = SLICES + [PADDING]
  valid = [True] * len(SLICES) + [False]
  while len(rows) % batch_size:
    rows.append(PADDING)
    valid.append(False)
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = range(start, start + batch_size)
    image = np.zeros((batch_size, H, W, 3), np.float32)
    image[:, 0, 0, 0] = list(chunk)
    batches.append(
      {
        'image': image[None],
        'gt_classes': np.stack([rows[i][0] for i in chunk])[None],
        'gt_masks': np.stack([rows[i][1] for i in chunk])[None],
        'gt_valid': np.stack([rows[i][2] for i in chunk])[None],
        'example_valid': np.array([valid[i] for i in chunk])[None],
      }
    )
  predictions = np.stack([r[3] for r in rows])
  return batches, predictions


def _lookup_detect_fn(predictions):
  """Stands in for the compiled detection: batch-sharded label maps, as make_detect_fn gives."""

  def detect(variables, images):
    del variables
    rows = np.asarray(images)[:, 0, 0, 0].astype(int)
    return parallel.shard_batch({'label_map': predictions[rows]}, parallel.data_mesh())

  return detect


def _reference(num_classes=4):
  """Pooled Dice from the definition, by loops over the real slices' pixels."""
  inter, pred, true = (np.zeros(num_classes) for _ in range(3))
  for classes, masks, valid, prediction in SLICES:
    truth = np.zeros((H, W), np.int32)
    for m in range(M):  # later slots paint over earlier ones
      if valid[m]:
        truth[masks[m] > 0] = classes[m]
    for c in range(1, num_classes + 1):
      for r in range(H):
        for q in range(W):
          inter[c - 1] += truth[r, q] == c and prediction[r, q] == c
          pred[c - 1] += prediction[r, q] == c
          true[c - 1] += truth[r, q] == c
  return [2 * i / (p + t) if p + t else np.nan for i, p, t in zip(inter, pred, true)]


@pytest.mark.parametrize('batch_size', [2, 4])
def test_pooled_validation_dice_and_the_absent_class_rule(batch_size):
  batches, predictions = _dataset(batch_size)
  dice, example = train.slice_dice(
    _lookup_detect_fn(predictions), None, batches, parallel.data_mesh(), num_classes=4
  )
  np.testing.assert_allclose(dice, HAND, rtol=1e-12)
  np.testing.assert_allclose(dice, _reference(), rtol=1e-12)
  # The overlay example: the slice of the first batch with the most true foreground (slice 0,
  # 12 px, against slice 1's 4 and, with 4 per batch, slice 2's 13 px).
  want = 2 if batch_size == 4 else 0
  np.testing.assert_array_equal(example['pred'], SLICES[want][3])
  assert example['image'][0, 0, 0] == want
  assert (example['truth'] > 0).sum() == (12, 13)[want // 2]


def test_dice_from_counts_rule_by_hand():
  # [intersection, predicted, true] per class
  counts = np.array([[3, 0, 0, 0], [4, 0, 5, 0], [4, 2, 0, 0]], np.float64)
  np.testing.assert_allclose(train.dice_from_counts(counts), [6 / 8, 0.0, 0.0, np.nan])


def test_mean_dice_leaves_absent_classes_out():
  # A class absent from truth and prediction must neither lift the mean (as a 1 would: a
  # label scheme that lacks two tissues looked half learnt) nor lower it.
  assert train.mean_dice(np.array([0.5, np.nan, 0.7, np.nan])) == pytest.approx(0.6)
  assert np.isnan(train.mean_dice(np.array([np.nan, np.nan])))


def test_no_valid_slice_gives_no_example():
  batches, predictions = _dataset(2)
  only_padding = [dict(b, example_valid=np.zeros_like(b['example_valid'])) for b in batches]
  dice, example = train.slice_dice(
    _lookup_detect_fn(predictions), None, only_padding, parallel.data_mesh(), num_classes=4
  )
  assert example is None
  assert np.isnan(dice).all()  # nothing anywhere: every class absent
