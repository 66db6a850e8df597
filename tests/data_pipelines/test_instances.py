"""Instances from label slices against plain loops, scipy.ndimage.label and a flood fill."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import support
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from data_pipelines import instances
from data_pipelines.errors import DataError

KNEE = {1: 1, 2: 2, 3: 3, 4: 4}

label_slices = hnp.arrays(
  np.uint8,
  hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
  elements=st.integers(0, 5),
)


def _loop_box(mask: np.ndarray) -> tuple[float, float, float, float]:
  """Tight box by visiting every pixel: (first row, first col, last row + 1, last col + 1)."""
  y1 = x1 = 10**9
  y2 = x2 = -1
  for r in range(mask.shape[0]):
    for c in range(mask.shape[1]):
      if mask[r, c]:
        y1, x1, y2, x2 = min(y1, r), min(x1, c), max(y2, r + 1), max(x2, c + 1)
  return float(y1), float(x1), float(y2), float(x2)


def _flood_fill_components(mask: np.ndarray, connectivity: int) -> list[np.ndarray]:
  """Connected components by breadth-first search, in raster order of their first pixel."""
  steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
  if connectivity == 8:
    steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
  seen = np.zeros(mask.shape, bool)
  components = []
  for r in range(mask.shape[0]):
    for c in range(mask.shape[1]):
      if mask[r, c] and not seen[r, c]:
        component = np.zeros(mask.shape, bool)
        queue = deque([(r, c)])
        seen[r, c] = True
        while queue:
          y, x = queue.popleft()
          component[y, x] = True
          for dy, dx in steps:
            ny, nx = y + dy, x + dx
            if (
              0 <= ny < mask.shape[0]
              and 0 <= nx < mask.shape[1]
              and mask[ny, nx]
              and not seen[ny, nx]
            ):
              seen[ny, nx] = True
              queue.append((ny, nx))
        components.append(component)
  return components


@settings(max_examples=40, deadline=None)
@given(label_slices)
def test_per_class_instances_match_a_plain_loop(label_slice):
  found = instances.extract_instances(label_slice, KNEE, mode='per_class')
  expected_classes = [v for v in (1, 2, 3, 4) if (label_slice == v).any()]  # 5 is unmapped
  assert found.classes.tolist() == expected_classes
  assert found.classes.dtype == np.int32 and found.boxes.dtype == np.float32
  assert found.masks.dtype == bool and found.masks.shape[1:] == label_slice.shape
  for class_id, box, mask in zip(found.classes, found.boxes, found.masks):
    np.testing.assert_array_equal(mask, label_slice == class_id)
    assert tuple(box.tolist()) == _loop_box(mask)


@settings(max_examples=40, deadline=None)
@given(label_slices, st.sampled_from([4, 8]))
def test_components_match_scipy_label_and_a_flood_fill(label_slice, connectivity):
  found = instances.extract_instances(
    label_slice, KNEE, mode='components', connectivity=connectivity
  )
  structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
  position = 0
  for class_id in (1, 2, 3, 4):
    class_mask = label_slice == class_id
    _, scipy_count = ndimage.label(class_mask, structure=structure)
    expected = _flood_fill_components(class_mask, connectivity)
    assert len(expected) == scipy_count
    for component in expected:
      assert found.classes[position] == class_id
      np.testing.assert_array_equal(found.masks[position], component)
      assert tuple(found.boxes[position].tolist()) == _loop_box(component)
      position += 1
  assert position == len(found)


def test_diagonal_pixels_join_under_8_connectivity_only():
  label_slice = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], np.uint8)
  assert len(instances.extract_instances(label_slice, {1: 1}, mode='components')) == 1
  assert (
    len(instances.extract_instances(label_slice, {1: 1}, mode='components', connectivity=4)) == 2
  )


def test_min_pixels_drops_small_pieces_and_shared_class_ids_merge():
  label_slice = np.zeros((6, 8), np.uint8)
  label_slice[0:3, 0:3] = 1  # 9 pixels
  label_slice[5, 7] = 1  # 1 pixel, dropped
  label_slice[4:6, 2:5] = 2  # 6 pixels; values 1 and 2 both map to class 1
  label_slice[0, 6] = 9  # unmapped
  found = instances.extract_instances(label_slice, {1: 1, 2: 1}, mode='components', min_pixels=2)
  assert found.classes.tolist() == [1, 1]
  assert found.areas.tolist() == [9, 6]
  assert found.boxes.tolist() == [[0, 0, 3, 3], [4, 2, 6, 5]]
  merged = instances.extract_instances(label_slice, {1: 1, 2: 1}, mode='per_class', min_pixels=2)
  assert merged.classes.tolist() == [1] and merged.areas.tolist() == [16]
  assert merged.boxes.tolist() == [[0, 0, 6, 8]]


def test_empty_slice_gives_no_instances_with_the_right_shapes():
  found = instances.extract_instances(np.zeros((4, 5), np.uint8), KNEE)
  assert len(found) == 0
  assert found.boxes.shape == (0, 4) and found.masks.shape == (0, 4, 5)
  padded = support.pad_instances(found, 3)
  assert not padded.valid.any() and padded.classes.tolist() == [0, 0, 0]


def test_pad_instances_shapes_padding_and_keep_largest():
  label_slice = np.zeros((8, 10), np.uint8)
  label_slice[0, 0] = 1  # area 1
  label_slice[2:5, 2:5] = 2  # area 9
  label_slice[7, 3:7] = 3  # area 4
  label_slice[0:2, 8:10] = 4  # area 4
  found = instances.extract_instances(label_slice, KNEE)
  padded = support.pad_instances(found, 6)
  assert padded.classes.dtype == np.int32 and padded.boxes.dtype == np.float32
  assert padded.masks.dtype == np.uint8 and padded.valid.dtype == bool
  assert padded.masks.shape == (6, 8, 10)
  assert padded.classes.tolist() == [1, 2, 3, 4, 0, 0]
  assert padded.valid.tolist() == [True] * 4 + [False] * 2
  np.testing.assert_array_equal(padded.boxes[:4], found.boxes)
  np.testing.assert_array_equal(padded.masks[:4], found.masks.astype(np.uint8))
  assert not padded.boxes[4:].any() and not padded.masks[4:].any()
  trimmed = support.pad_instances(found, 2, overflow='keep_largest')
  # Largest: class 2 (9 px), then classes 3 and 4 tie at 4 px -> the earlier one, class 3.
  assert trimmed.classes.tolist() == [2, 3] and trimmed.num_dropped == 2
  assert trimmed.valid.all()
  with pytest.raises(DataError, match='slice: more instances than the static maximum'):
    support.pad_instances(found, 2)


def test_select_slices_is_deterministic_and_keeps_the_requested_share():
  rng = np.random.default_rng(0)
  has_instances = rng.random(200) < 0.3
  empty = int((~has_instances).sum())
  keep = instances.select_slices(has_instances, 0.25, seed=7, key='knee_0001')
  assert keep[has_instances].all()
  assert int((keep & ~has_instances).sum()) == round(0.25 * empty)
  again = instances.select_slices(has_instances, 0.25, seed=7, key='knee_0001')
  np.testing.assert_array_equal(keep, again)
  other_case = instances.select_slices(has_instances, 0.25, seed=7, key='knee_0002')
  other_seed = instances.select_slices(has_instances, 0.25, seed=8, key='knee_0001')
  assert not np.array_equal(keep, other_case) and not np.array_equal(keep, other_seed)
  np.testing.assert_array_equal(instances.select_slices(has_instances, 0.0, 7), has_instances)
  assert instances.select_slices(has_instances, 1.0, 7).all()
