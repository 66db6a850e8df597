"""Canonical reorientation, the exact way back, and the anatomical slicing conventions."""

from __future__ import annotations

import itertools
import os

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from data_pipelines import orientation
from data_pipelines.orientation import SourceGrid

SPACING = (0.4, 0.6, 1.5)  # mm along R, A, S of the reference (canonical) volume
SHAPE = (5, 6, 7)


def _ras_affine(spacing=SPACING, origin=(-10.0, 20.0, 5.0)) -> np.ndarray:
  affine = np.diag(list(spacing) + [1.0])
  affine[:3, 3] = origin
  return affine


def _reoriented(volume: np.ndarray, affine: np.ndarray, perm, flips):
  """The same anatomy stored differently: array axis i of the result is axis perm[i] of
  `volume`, reversed where flips[i]; the affine is rebuilt so that every voxel keeps its world
  position (written out by hand: new index n along a flipped axis is old index size-1-n)."""
  array = np.transpose(volume, perm)
  new_affine = np.zeros((4, 4))
  new_affine[3, 3] = 1.0
  new_affine[:3, 3] = affine[:3, 3]
  for i, (axis, flip) in enumerate(zip(perm, flips)):
    column = affine[:3, axis]
    if flip:
      array = np.flip(array, i)
      new_affine[:3, 3] += column * (volume.shape[axis] - 1)
      column = -column
    new_affine[:3, i] = column
  return np.ascontiguousarray(array), new_affine


ALL_ORIENTATIONS = [
  (perm, flips)
  for perm in itertools.permutations(range(3))
  for flips in itertools.product([False, True], repeat=3)
]


def test_every_orientation_returns_to_the_canonical_array_and_back_exactly():
  reference = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
  affine = _ras_affine()
  for perm, flips in ALL_ORIENTATIONS:
    stored, stored_affine = _reoriented(reference, affine, perm, flips)
    grid = SourceGrid.from_affine(stored.shape, stored_affine)
    canonical = grid.to_canonical(stored)
    np.testing.assert_array_equal(canonical, reference, err_msg=f'{perm} {flips}')
    np.testing.assert_allclose(grid.canonical_affine, affine, atol=1e-12)
    np.testing.assert_allclose(grid.canonical_spacing, SPACING)
    back = grid.to_original(canonical)
    assert back.dtype == stored.dtype
    np.testing.assert_array_equal(back, stored)
    # Trailing axes (e.g. class probabilities) travel along unchanged.
    channels = np.stack([stored, -stored], axis=-1)
    np.testing.assert_array_equal(grid.to_original(grid.to_canonical(channels)), channels)


def test_canonical_voxels_sit_at_the_same_world_points_as_original_voxels():
  stored, stored_affine = _reoriented(
    np.zeros(SHAPE), _ras_affine(), (2, 0, 1), (True, False, True)
  )
  grid = SourceGrid.from_affine(stored.shape, stored_affine)
  original_index = np.stack(np.meshgrid(*[np.arange(n) for n in stored.shape], indexing='ij'), -1)
  canonical_index_of_original = grid.to_canonical(original_index)  # [X, Y, Z, 3] original ijk
  for x, y, z in itertools.product(*[range(n) for n in grid.canonical_shape]):
    i, j, k = canonical_index_of_original[x, y, z]
    np.testing.assert_allclose(
      grid.canonical_affine @ [x, y, z, 1], stored_affine @ [i, j, k, 1], atol=1e-9
    )


def test_matches_nibabel_closest_canonical_on_nibabel_example_file():
  image = nib.load(os.path.join(data_path, 'anatomical.nii'))
  grid = SourceGrid.from_affine(image.shape, image.affine)
  assert grid.axcodes == ('L', 'A', 'S')
  reference = nib.as_closest_canonical(image)
  np.testing.assert_array_equal(grid.to_canonical(image.get_fdata()), reference.get_fdata())
  np.testing.assert_allclose(grid.canonical_affine, reference.affine)


def test_oblique_affine_reorients_to_the_nearest_ras_axes():
  angle = np.deg2rad(12.0)
  rotation = np.array(
    [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
  )
  affine = np.eye(4)
  affine[:3, :3] = rotation @ np.diag(SPACING)
  stored, stored_affine = _reoriented(np.zeros(SHAPE), affine, (1, 2, 0), (True, True, False))
  grid = SourceGrid.from_affine(stored.shape, stored_affine)
  assert nib.aff2axcodes(grid.canonical_affine) == ('R', 'A', 'S')
  assert grid.canonical_shape == SHAPE
  np.testing.assert_allclose(grid.canonical_spacing, SPACING)


def _world_coordinates(shape, affine) -> np.ndarray:
  index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1)
  return index @ affine[:3, :3].T + affine[:3, 3]  # [X, Y, Z, 3] mm, (R, A, S)


# Expected direction of travel in world coordinates (R, A, S) along slices, rows, columns.
UPRIGHT = {
  'sagittal': {'slices': (0, +1), 'rows': (2, -1), 'cols': (1, -1)},
  'coronal': {'slices': (1, +1), 'rows': (2, -1), 'cols': (0, -1)},
  'axial': {'slices': (2, +1), 'rows': (1, -1), 'cols': (0, -1)},
}


@pytest.mark.parametrize('plane', orientation.PLANES)
def test_slices_are_anatomically_upright(plane):
  affine = _ras_affine()
  world = _world_coordinates(SHAPE, affine)
  stack = orientation.volume_to_slices(world, plane)  # [n, H, W, 3]
  expected = UPRIGHT[plane]
  for name, axis in (('slices', 0), ('rows', 1), ('cols', 2)):
    coordinate, sign = expected[name]
    step = np.diff(stack[..., coordinate], axis=axis)
    assert (np.sign(step) == sign).all(), (plane, name)
    # ... and the other two coordinates do not change along that axis.
    for other in {0, 1, 2} - {coordinate}:
      np.testing.assert_allclose(np.diff(stack[..., other], axis=axis), 0.0, atol=1e-12)
  row_mm, col_mm = orientation.pixel_spacing(SPACING, plane)
  assert row_mm == SPACING[expected['rows'][0]]
  assert col_mm == SPACING[expected['cols'][0]]
  assert orientation.slice_thickness(SPACING, plane) == SPACING[expected['slices'][0]]
  np.testing.assert_array_equal(orientation.slices_to_volume(stack, plane), world)


@pytest.mark.parametrize('plane', orientation.PLANES)
def test_two_storage_orders_of_one_anatomy_give_identical_slices(plane):
  reference = np.random.default_rng(1).integers(0, 5, size=SHAPE).astype(np.uint8)
  affine = _ras_affine()
  first, first_affine = _reoriented(reference, affine, (2, 1, 0), (False, True, False))
  second, second_affine = _reoriented(reference, affine, (1, 0, 2), (True, False, True))
  assert first.shape != second.shape or not np.array_equal(first, second)
  slices = []
  for stored, stored_affine in ((first, first_affine), (second, second_affine)):
    grid = SourceGrid.from_affine(stored.shape, stored_affine)
    slices.append(orientation.volume_to_slices(grid.to_canonical(stored), plane))
  np.testing.assert_array_equal(slices[0], slices[1])


def test_unknown_plane_and_wrong_shapes_are_refused():
  with pytest.raises(ValueError, match='unknown plane'):
    orientation.volume_to_slices(np.zeros(SHAPE), 'oblique')
  grid = SourceGrid.from_affine(SHAPE, _ras_affine())
  with pytest.raises(ValueError, match='does not match the source grid'):
    grid.to_canonical(np.zeros((5, 6, 8)))
