"""Cartilage thickness against shells and slabs of known thickness, in anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imask_jax.metrics.overlap import CaseStatus
from imask_jax.metrics.thickness import interface_thickness
from imask_jax.metrics.thickness_maps import (
  Cylinder,
  KneeLabelValues,
  compare_thickness,
  cylinder_coordinates,
  femoral_thickness_map,
  fit_cylinder,
  thickness_difference,
  tibial_thickness_map,
)


def coordinates(
  shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> list[np.ndarray]:
  """Voxel-centre coordinates in array mm (RAS+: x right, y anterior, z superior)."""
  grid = np.indices(shape, dtype=float)
  return [grid[i] * spacing[i] for i in range(3)]


def knee(
  shape=(50, 100, 120), spacing=(0.8, 0.5, 0.5), tibial_top_mm=12.5, femoral_outer_mm=17.5
) -> np.ndarray:
  """A tibia slab (z < 10 mm) under 2.5 mm of tibial cartilage, and a femoral cylinder
  (axis along x at y = 25, z = 35 mm, radius 15 mm) inside a cartilage shell."""
  x, y, z = coordinates(shape, spacing)
  labels = np.zeros(shape, np.uint8)
  labels[z < 10.0] = 3
  labels[(z >= 10.0) & (z < tibial_top_mm)] = 4
  radius = np.hypot(y - 25.0, z - 35.0)
  labels[(radius >= 15.0) & (radius < femoral_outer_mm)] = 2
  labels[radius < 15.0] = 1
  return labels


# ----------------------------------------------------------------------------- 3D thickness


def test_flat_layer_of_n_voxels_measures_exactly_n_spacings():
  # Interfaces at voxel faces: 5 cartilage voxels are 5 * 0.7 mm thick, not 4 * 0.7.
  spacing = (0.4, 0.5, 0.7)
  labels = np.zeros((12, 10, 16), np.uint8)
  labels[:, :, :4] = 3
  labels[:, :, 4:9] = 4
  points = interface_thickness(labels, spacing, bone_label=3, cartilage_label=4, method='nearest')
  assert len(points.thickness_mm) == 12 * 10
  np.testing.assert_allclose(points.thickness_mm, 5 * 0.7)
  np.testing.assert_allclose(points.positions_mm[:, 2], 3.5 * 0.7)  # the face at z index 3.5


@pytest.mark.parametrize('spacing', [(0.5, 0.5, 0.5), (0.4, 0.45, 0.7)])
@pytest.mark.parametrize('width', [1.0, 3.0])
def test_spherical_shell_of_known_width(spacing, width):
  radius = 12.0
  shape = tuple(int((2 * (radius + width) + 3) / s) for s in spacing)
  x, y, z = coordinates(shape, spacing)
  centre = [n * s / 2 for n, s in zip(shape, spacing)]
  r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
  labels = np.zeros(shape, np.uint8)
  labels[r < radius] = 1
  labels[(r >= radius) & (r < radius + width)] = 2
  thickness = interface_thickness(labels, spacing, 1, 2, method='nearest').thickness_mm
  # Face centres of a staircase lie up to half a voxel on either side of the true sphere, and
  # the nearest neighbour picks the nearer ones: the mean reads low by about 0.2 of the largest
  # spacing (measured 0.07 to 0.14 mm on these shells), never by a whole voxel.
  assert thickness.mean() == pytest.approx(width, abs=0.3 * max(spacing))
  assert thickness.mean() < width
  assert np.all(np.abs(thickness - width) < 1.5 * max(spacing))


# ----------------------------------------------------------------------------- maps


def test_femoral_map_of_a_cylindrical_shell_recovers_its_thickness_field():
  spacing = (0.8, 0.5, 0.5)
  shape = (50, 110, 110)
  x, y, z = coordinates(shape, spacing)
  y, z = y - 27.5, z - 27.5
  length = shape[0] * spacing[0]

  def field(angle_deg, x_mm):
    return 2.0 + 0.6 * np.cos(np.radians(angle_deg)) + 0.4 * np.sin(2 * np.pi * x_mm / length)

  radius = np.hypot(y, z)
  angle = np.degrees(np.arctan2(y, -z))  # 0 = inferior, +90 = anterior
  labels = np.zeros(shape, np.uint8)
  labels[radius < 18.0] = 1
  labels[(radius >= 18.0) & (radius < 18.0 + field(angle, x))] = 2
  thickness_map = femoral_thickness_map(
    labels, spacing, angle_bin_deg=5, axial_bin_mm=2, method='nearest'
  )

  cylinder = thickness_map.cylinder
  np.testing.assert_allclose(cylinder.axis, [1, 0, 0], atol=1e-3)
  np.testing.assert_allclose(cylinder.center_mm[1:], [27.5, 27.5], atol=0.05)
  assert cylinder.radius_mm == pytest.approx(18.0, abs=0.25)  # the BCI faces: +-half a voxel
  assert thickness_map.thickness_mm.shape == (72, 21)  # 5 deg rows; 2 mm cols centred on 0
  assert (thickness_map.row_name, thickness_map.col_name) == ('angle_deg', 'axial_mm')
  angle_c, axial_c = np.meshgrid(
    thickness_map.row_centers, thickness_map.col_centers, indexing='ij'
  )
  expected = field(angle_c, axial_c + cylinder.center_mm[0])
  error = thickness_map.thickness_mm - expected
  # Every cell has cartilage; the cell error is voxel-scale (measured: mean -0.03, mean
  # |error| 0.10, max 0.37 mm with 0.5-0.8 mm voxels).
  assert not np.isnan(thickness_map.thickness_mm).any()
  assert abs(np.mean(error)) < 0.1
  assert np.mean(np.abs(error)) < 0.15
  assert np.max(np.abs(error)) < max(spacing)
  assert thickness_map.mean_thickness_mm == pytest.approx(np.mean(expected), abs=0.1)


def test_tibial_map_of_a_layer_recovers_its_thickness_field():
  spacing = (0.5, 0.5, 0.4)
  shape = (80, 70, 40)
  x, y, z = coordinates(shape, spacing)
  size_x, size_y = shape[0] * spacing[0], shape[1] * spacing[1]

  def field(x_mm, y_mm):
    return 2.0 + 0.5 * np.sin(2 * np.pi * x_mm / size_x) * np.cos(2 * np.pi * y_mm / size_y)

  labels = np.zeros(shape, np.uint8)
  labels[z < 4.2] = 3
  labels[(z >= 4.2) & (z < 4.2 + field(x, y))] = 4
  thickness_map = tibial_thickness_map(labels, spacing, bin_mm=2.0, method='nearest')
  assert (thickness_map.row_name, thickness_map.col_name) == ('anterior_mm', 'right_mm')
  anterior_c, right_c = np.meshgrid(
    thickness_map.row_centers, thickness_map.col_centers, indexing='ij'
  )
  error = thickness_map.thickness_mm - field(right_c, anterior_c)
  # Whole voxels quantise the layer to +-half the 0.4 mm z spacing per column; cells average
  # columns (measured: mean |error| 0.06, max 0.17 mm).
  assert not np.isnan(error).any()
  assert np.mean(np.abs(error)) < 0.25 * spacing[2]
  assert np.max(np.abs(error)) < 0.75 * spacing[2]


def test_maps_are_nan_where_there_is_no_cartilage():
  spacing = (1.0, 1.0, 0.5)
  labels = np.zeros((20, 20, 20), np.uint8)
  labels[:, :, :6] = 3
  labels[:10, :, 6:10] = 4  # cartilage on the left half only
  thickness_map = tibial_thickness_map(
    labels, spacing, bin_mm=1.0, right_range_mm=(0, 20), method='nearest'
  )
  right = thickness_map.col_centers
  np.testing.assert_allclose(right, np.arange(21.0))  # cells centred on the voxel columns
  values = thickness_map.thickness_mm
  assert np.all(np.isnan(values[:, right >= 10]))
  np.testing.assert_allclose(values[:, right <= 7], 4 * 0.5)  # 4 voxels of 0.5 mm
  # Near the rim the nearest articular face is the lowest face of the side wall, at x = 9.5,
  # z = 3.0 mm, while the interface faces lie at z = 2.75 mm: the thickness tapers there
  # (the array's own edge at x = 0 is no surface, so no taper there).
  np.testing.assert_allclose(values[:, right == 8], math.hypot(1.5, 0.25))
  np.testing.assert_allclose(values[:, right == 9], math.hypot(0.5, 0.25))
  assert thickness_map.mean_thickness_mm == pytest.approx(np.nanmean(values))


def test_default_bins_are_never_finer_than_the_voxels():
  # 1.5 mm slices left-right: 1 mm bins would leave every third column empty.
  spacing = (1.5, 0.75, 0.75)
  labels = np.zeros((16, 30, 12), np.uint8)
  labels[:, :, :4] = 3
  labels[:, :, 4:7] = 4
  thickness_map = tibial_thickness_map(labels, spacing, method='nearest')
  assert np.diff(thickness_map.col_edges)[0] == pytest.approx(1.5)
  np.testing.assert_allclose(thickness_map.thickness_mm, 3 * 0.75)  # no empty cell at all


# ----------------------------------------------------------------------------- differences


def test_one_voxel_thicker_prediction_differs_by_one_spacing():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing=spacing)
  pred = knee(spacing=spacing, tibial_top_mm=13.0)  # one more 0.5 mm voxel of cartilage
  plates = compare_thickness(
    pred, truth, spacing, angle_bin_deg=3, axial_bin_mm=2, tibial_bin_mm=2, method='nearest'
  )
  tibial = plates['tibial']
  assert tibial.status is CaseStatus.OK
  assert tibial.difference.mean_mm == pytest.approx(0.5, abs=1e-9)
  assert tibial.difference.sd_mm == pytest.approx(0.0, abs=1e-9)
  assert tibial.truth.mean_thickness_mm == pytest.approx(2.5, abs=1e-9)
  femoral = plates['femoral']  # identical femoral cartilage: zero difference on one grid
  assert femoral.difference.mean_mm == 0 and femoral.difference.sd_mm == 0
  assert femoral.difference.n_cells == np.isfinite(femoral.truth.thickness_mm).sum() > 0
  assert femoral.pred.cylinder == femoral.truth.cylinder


def test_thicker_femoral_shell_reads_about_half_a_millimetre_more():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing=spacing)
  pred = knee(spacing=spacing, femoral_outer_mm=18.0)
  femoral = compare_thickness(
    pred, truth, spacing, angle_bin_deg=3, axial_bin_mm=2, method='nearest'
  )['femoral']
  # Both shells are voxelised curves with the same interface; the outer radius grows 0.5 mm.
  assert femoral.difference.mean_mm == pytest.approx(0.5, abs=0.1)
  assert femoral.truth.mean_thickness_mm == pytest.approx(2.5, abs=0.2)


def test_missing_predicted_plate_is_flagged_as_missed():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing=spacing)
  pred = truth.copy()
  pred[pred == 4] = 0
  tibial = compare_thickness(pred, truth, spacing, tibial_bin_mm=2, method='nearest')['tibial']
  assert tibial.status is CaseStatus.MISSED
  assert tibial.difference.n_cells == 0 and math.isnan(tibial.difference.mean_mm)
  assert np.all(np.isnan(tibial.pred.thickness_mm))
  with pytest.raises(ValueError, match='the truth has no tibial cartilage'):
    compare_thickness(truth, pred, spacing, method='nearest')


def test_maps_on_different_grids_are_not_subtracted():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing=spacing)
  a = tibial_thickness_map(truth, spacing, bin_mm=1.0, method='nearest')
  b = tibial_thickness_map(truth, spacing, bin_mm=2.0, method='nearest')
  with pytest.raises(ValueError, match='different grids'):
    thickness_difference(a, b)


# ----------------------------------------------------------------------------- cylinder


def test_fit_cylinder_recovers_a_tilted_cylinder():
  rng = np.random.default_rng(0)
  axis = np.array([1.0, 0.08, -0.05])
  axis /= np.linalg.norm(axis)
  centre = np.array([20.0, 30.0, 40.0])
  u = np.cross(axis, [0.0, 0.0, 1.0])
  u /= np.linalg.norm(u)
  v = np.cross(axis, u)
  angle = rng.uniform(-2.0, 2.0, 2000)  # a 230 degree arc, like condyles
  along = rng.uniform(-20, 20, 2000)
  points = (
    centre
    + np.outer(along, axis)
    + 22.0 * (np.outer(np.cos(angle), u) + np.outer(np.sin(angle), v))
  )
  points += rng.normal(0, 0.05, points.shape)
  cylinder = fit_cylinder(points)
  np.testing.assert_allclose(cylinder.axis, axis, atol=2e-3)
  assert cylinder.radius_mm == pytest.approx(22.0, abs=0.02)
  # The fitted centre is on the true axis.
  offset = cylinder.center_mm - centre
  assert np.linalg.norm(offset - (offset @ axis) * axis) < 0.05
  assert cylinder.rms_residual_mm == pytest.approx(0.05, abs=0.01)


def test_cylinder_angles_follow_the_stated_convention():
  cylinder = Cylinder(
    center_mm=np.zeros(3), axis=np.array([1.0, 0.0, 0.0]), radius_mm=5.0, rms_residual_mm=0.0
  )
  points = np.array([[0, 0, -5], [0, 5, 0], [0, -5, 0], [3, 0, 5.0]])
  angle, axial = cylinder_coordinates(points, cylinder)
  np.testing.assert_allclose(angle, [0, 90, -90, 180])  # inferior, anterior, posterior, up
  np.testing.assert_allclose(axial, [0, 0, 0, 3])


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match=r'label_map has shape \(4, 4\); expected a 3D'):
    interface_thickness(np.zeros((4, 4), np.uint8), (1, 1), 1, 2)
  with pytest.raises(ValueError, match='both 2'):
    interface_thickness(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), 2, 2)
  with pytest.raises(ValueError, match='need at least 6 to fit the projection cylinder'):
    femoral_thickness_map(np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
  with pytest.raises(ValueError, match='positive bin size'):
    tibial_thickness_map(knee(), (0.8, 0.5, 0.5), bin_mm=0)
  with pytest.raises(TypeError, match='expected an integer label map'):
    interface_thickness(np.zeros((4, 4, 4), float), (1, 1, 1), 1, 2)
  assert KneeLabelValues() == KneeLabelValues(1, 2, 3, 4)
