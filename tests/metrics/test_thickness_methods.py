"""The two thickness methods against shapes of known thickness, and map coverage.

'nearest' (the default) and 'normal' (the surface-normal method) on flat layers, oblique slabs
and spherical shells voxelised at several spacings, the normal method plugged into the maps
and compare_thickness, and the coverage of a difference map on hand-built maps.

The analytic truth: a voxel belongs to a shape when its centre lies inside the continuous
shape, so a slab of thickness T voxelised at a generic (irrational) orientation holds, averaged
over its area, exactly T of cartilage along its normal; a shell between radii R and R + T is T
thick along every radius.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from imask_jax.metrics.overlap import CaseStatus
from imask_jax.metrics.thickness import (
  DEFAULT_THICKNESS_METHOD,
  THICKNESS_METHODS,
  default_smoothing_mm,
  interface_thickness,
)
from imask_jax.metrics.thickness_maps import (
  ThicknessCoverage,
  ThicknessDifference,
  ThicknessMap,
  compare_thickness,
  femoral_thickness_map,
  thickness_difference,
  tibial_thickness_map,
)

BONE, CARTILAGE = 1, 2
# The budget for the whole pipeline is 3 % of the truth; the measure itself may use at
# most 2.5 % of a 2 mm layer. Measured on the shapes below: the normal method within 0.023 mm
# (a slab 14 deg off the 1.5 mm axis at 0.8 x 0.8 x 1.5 mm, whose 6 mm wide terraces the
# smoothing does not quite flatten), 0.009 mm at 0.365 mm in-plane; the nearest neighbour
# 0.05 to 0.21 mm low.
TOLERANCE_MM = 0.05
# Generic normals (irrational ratios, so the voxel centres' distances to the plane fill every
# phase and the voxelised slab is T thick on average): oblique to every axis; 14 deg off z
# (wide terraces of z steps); 18 deg off x.
SQRT2, SQRT3, SQRT5, SQRT7 = (math.sqrt(v) for v in (2, 3, 5, 7))
NORMALS = {
  'oblique': (1.0, SQRT2, SQRT3),
  'shallow_z': (0.1 * SQRT2, 0.1 * SQRT3, 1.0),
  'shallow_x': (1.0, 0.1 * SQRT5, 0.1 * SQRT7),
}
SPACINGS = [(0.365, 0.365, 0.365), (0.365, 0.365, 0.7), (0.8, 0.8, 1.5)]


def coordinates(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
  """Voxel-centre coordinates in array mm."""
  grid = np.indices(shape, dtype=float)
  return [grid[i] * spacing[i] for i in range(3)]


def slab(thickness: float, spacing, normal, size_mm: float = 20.0) -> np.ndarray:
  """Bone below a plane through a point near the box centre (not on a voxel centre), cartilage
  from it to `thickness` mm along `normal`, background beyond."""
  shape = tuple(int(size_mm / s) for s in spacing)
  x, y, z = coordinates(shape, spacing)
  n = np.asarray(normal, float) / np.linalg.norm(normal)
  point = size_mm / 2 + np.array([0.13, 0.29, 0.41]) * np.asarray(spacing)
  distance = (x - point[0]) * n[0] + (y - point[1]) * n[1] + (z - point[2]) * n[2]
  labels = np.zeros(shape, np.uint8)
  labels[distance < 0] = BONE
  labels[(distance >= 0) & (distance < thickness)] = CARTILAGE
  return labels


def shell(radius: float, thickness: float, spacing) -> np.ndarray:
  """A bone ball of `radius` mm inside a cartilage shell `thickness` mm thick."""
  shape = tuple(int((2 * (radius + thickness) + 6) / s) for s in spacing)
  x, y, z = coordinates(shape, spacing)
  centre = [n * s / 2 + f * s for n, s, f in zip(shape, spacing, (0.13, 0.29, 0.41))]
  r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
  labels = np.zeros(shape, np.uint8)
  labels[r < radius] = BONE
  labels[(r >= radius) & (r < radius + thickness)] = CARTILAGE
  return labels


def mean_thickness(labels, spacing, method, margin_mm=None) -> float:
  """Mean thickness over the BCI points, those within margin_mm of the array's faces left out
  (where the slab is cut by the field of view)."""
  points = interface_thickness(labels, spacing, BONE, CARTILAGE, method=method)
  keep = np.ones(len(points.thickness_mm), bool)
  if margin_mm is not None:
    size = np.asarray(labels.shape) * np.asarray(spacing)
    keep = np.all(
      (points.positions_mm > margin_mm) & (points.positions_mm < size - margin_mm), axis=1
    )
  assert keep.sum() > 100
  return float(points.thickness_mm[keep].mean())


# ----------------------------------------------------------------------------- 3D thickness


def test_the_functions_and_the_config_share_one_default_method():
  # One home: what a researcher gets calling the metrics is what evaluate and predict measure.
  from imask_jax import configs

  assert THICKNESS_METHODS == ('nearest', 'normal')
  assert configs.default_config().eval.thickness_method == DEFAULT_THICKNESS_METHOD == 'normal'
  for function in (
    interface_thickness,
    femoral_thickness_map,
    tibial_thickness_map,
    compare_thickness,
  ):
    assert inspect.signature(function).parameters['method'].default == DEFAULT_THICKNESS_METHOD


def test_flat_layer_of_n_voxels_measures_exactly_n_spacings_along_the_normal():
  # Smoothed, an axis-aligned step is antisymmetric about the voxel face, so both 0.5
  # iso-surfaces lie exactly on the faces; only the bisection's 0.1 mm / 2**12 remains.
  spacing = (0.4, 0.5, 0.7)
  labels = np.zeros((12, 10, 16), np.uint8)
  labels[:, :, :4] = 3
  labels[:, :, 4:9] = 4
  points = interface_thickness(labels, spacing, bone_label=3, cartilage_label=4, method='normal')
  assert len(points.thickness_mm) == 12 * 10  # one point per interface face
  np.testing.assert_allclose(points.thickness_mm, 5 * 0.7, atol=1e-4)
  np.testing.assert_allclose(points.positions_mm[:, 2], 3.5 * 0.7, atol=1e-4)


@pytest.mark.parametrize('spacing', SPACINGS, ids=str)
@pytest.mark.parametrize('normal', NORMALS, ids=str)
def test_oblique_slab_normal_method_is_unbiased_and_beats_nearest(normal, spacing):
  thickness = 2.0
  labels = slab(thickness, spacing, NORMALS[normal])
  normal_bias = mean_thickness(labels, spacing, 'normal', margin_mm=5.0) - thickness
  nearest_bias = mean_thickness(labels, spacing, 'nearest', margin_mm=5.0) - thickness
  assert abs(normal_bias) <= TOLERANCE_MM
  # The nearest neighbour picks the nearer staircase faces: low, and further off.
  assert nearest_bias < -abs(normal_bias)


@pytest.mark.parametrize('spacing', SPACINGS + [(0.7, 0.365, 0.365)], ids=str)
def test_spherical_shell_normal_method_is_unbiased_and_beats_nearest(spacing):
  radius, thickness = 12.0, 2.0
  labels = shell(radius, thickness, spacing)
  # An isotropic Gaussian of SD s moves the 0.5 iso-surface of a ball of radius r inward by
  # s^2 / r (to first order), so the smoothed shell is s^2 T / (R (R + T)) thicker: 0.0016 mm
  # at 0.365 mm voxels, 0.027 mm with a 1.5 mm axis.
  sigma = float(default_smoothing_mm(spacing)[0])
  expected = thickness + sigma**2 * thickness / (radius * (radius + thickness))
  normal_bias = mean_thickness(labels, spacing, 'normal') - expected
  nearest_bias = mean_thickness(labels, spacing, 'nearest') - thickness
  assert abs(normal_bias) <= TOLERANCE_MM
  assert nearest_bias < -abs(normal_bias)


def test_default_smoothing_is_one_isotropic_sd_of_the_coarsest_spacing():
  np.testing.assert_allclose(default_smoothing_mm((0.365, 0.365, 0.7)), [0.7, 0.7, 0.7])
  spacing = (0.5, 0.5, 0.7)
  labels = shell(8.0, 2.0, spacing)
  default = interface_thickness(labels, spacing, BONE, CARTILAGE, method='normal')
  explicit = interface_thickness(
    labels, spacing, BONE, CARTILAGE, method='normal', smoothing_mm=0.7
  )
  np.testing.assert_array_equal(default.thickness_mm, explicit.thickness_mm)
  # More smoothing moves the iso-surfaces: the argument is used.
  smoother = interface_thickness(
    labels, spacing, BONE, CARTILAGE, method='normal', smoothing_mm=1.5
  )
  assert not np.array_equal(default.thickness_mm, smoother.thickness_mm)


def test_ray_stops_where_bone_begins_again():
  # Cartilage between two bones (a joint without a gap): the thickness is the layer between
  # them, not the distance to some articular surface beyond the second bone.
  spacing = (0.5, 0.5, 0.5)
  labels = np.zeros((10, 10, 30), np.uint8)
  labels[:, :, :8] = 3
  labels[:, :, 8:14] = 4  # 6 voxels = 3 mm
  labels[:, :, 14:] = 1  # another bone
  points = interface_thickness(labels, spacing, bone_label=3, cartilage_label=4, method='normal')
  np.testing.assert_allclose(points.thickness_mm, 3.0, atol=1e-4)


# ----------------------------------------------------------------------------- maps


def test_femoral_map_with_the_normal_method_recovers_the_thickness_field():
  # The cylindrical shell of test_thickness.py, its axis off the voxel centres.
  spacing = (0.8, 0.5, 0.5)
  shape = (50, 110, 110)
  x, y, z = coordinates(shape, spacing)
  y, z = y - 27.63, z - 27.81
  length = shape[0] * spacing[0]

  def field(angle_deg, x_mm):
    return 2.0 + 0.6 * np.cos(np.radians(angle_deg)) + 0.4 * np.sin(2 * np.pi * x_mm / length)

  radius = np.hypot(y, z)
  labels = np.zeros(shape, np.uint8)
  labels[radius < 18.0] = 1
  labels[(radius >= 18.0) & (radius < 18.0 + field(np.degrees(np.arctan2(y, -z)), x))] = 2
  errors = {}
  for method in THICKNESS_METHODS:
    thickness_map = femoral_thickness_map(
      labels, spacing, angle_bin_deg=5, axial_bin_mm=2, method=method
    )
    assert not np.isnan(thickness_map.thickness_mm).any()
    angle_c, axial_c = np.meshgrid(
      thickness_map.row_centers, thickness_map.col_centers, indexing='ij'
    )
    errors[method] = thickness_map.thickness_mm - field(
      angle_c, axial_c + thickness_map.cylinder.center_mm[0]
    )
  # A cylinder is a 2D staircase: where the surface runs near a lattice direction the voxelised
  # shell itself is off by a phase-dependent few hundredths of a mm per cell (measured over
  # four axis offsets: normal mean -0.02 to +0.05, nearest -0.03 to -0.11 mm).
  assert abs(np.mean(errors['normal'])) < 0.1
  assert np.mean(np.abs(errors['normal'])) < np.mean(np.abs(errors['nearest']))


def knee(spacing, tibial_top_mm=12.5, shape=(40, 80, 100)) -> np.ndarray:
  """A tibia slab (z < 10 mm) under tibial cartilage up to tibial_top_mm, and a femoral
  cylinder (axis along x at y = 20, z = 30 mm, radius 12 mm) in a 2.5 mm cartilage shell."""
  x, y, z = coordinates(shape, spacing)
  labels = np.zeros(shape, np.uint8)
  labels[z < 10.0] = 3
  labels[(z >= 10.0) & (z < tibial_top_mm)] = 4
  radius = np.hypot(y - 20.0, z - 30.0)
  labels[(radius >= 12.0) & (radius < 14.5)] = 2
  labels[radius < 12.0] = 1
  return labels


def test_compare_thickness_with_the_normal_method():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing)
  pred = knee(spacing, tibial_top_mm=13.0)  # one more 0.5 mm voxel of tibial cartilage
  plates = compare_thickness(
    pred, truth, spacing, angle_bin_deg=3, axial_bin_mm=2, tibial_bin_mm=2, method='normal'
  )
  tibial = plates['tibial']
  assert tibial.status is CaseStatus.OK
  assert tibial.truth.mean_thickness_mm == pytest.approx(2.5, abs=1e-4)  # flat: exact
  assert tibial.difference.mean_mm == pytest.approx(0.5, abs=1e-4)
  femoral = plates['femoral']  # identical femoral cartilage: zero difference on one grid
  assert femoral.difference.mean_mm == 0 and femoral.difference.sd_mm == 0
  assert femoral.truth.mean_thickness_mm == pytest.approx(2.5, abs=TOLERANCE_MM)
  assert femoral.difference.coverage == ThicknessCoverage(
    both=femoral.difference.n_cells, truth_only=0, pred_only=0
  )


def test_unknown_method_and_bad_smoothing_are_refused():
  labels = knee((0.8, 0.5, 0.5))
  with pytest.raises(ValueError, match=r"interface_thickness: method='mesh'"):
    interface_thickness(labels, (0.8, 0.5, 0.5), 1, 2, method='mesh')
  with pytest.raises(ValueError, match=r"compare_thickness: method='Normal'"):
    compare_thickness(labels, labels, (0.8, 0.5, 0.5), method='Normal')
  with pytest.raises(ValueError, match='smoothing_mm=-1'):
    interface_thickness(labels, (0.8, 0.5, 0.5), 1, 2, method='normal', smoothing_mm=-1)
  with pytest.raises(ValueError, match=r'smoothing_mm=\(1, 2\)'):
    interface_thickness(labels, (0.8, 0.5, 0.5), 1, 2, method='normal', smoothing_mm=(1, 2))


# ----------------------------------------------------------------------------- coverage


def flat_map(values: list[list[float]]) -> ThicknessMap:
  values = np.array(values, dtype=float)
  edges_r, edges_c = np.arange(values.shape[0] + 1.0), np.arange(values.shape[1] + 1.0)
  return ThicknessMap(
    values, edges_r, edges_c, 'anterior_mm', 'right_mm', float(np.nanmean(values)), None
  )


def test_coverage_counts_cells_of_each_map_by_hand():
  nan = math.nan
  truth = flat_map([[2.0, 2.0, 2.0, nan], [2.0, 2.0, 2.0, nan], [nan, nan, nan, nan]])
  pred = flat_map([[1.5, nan, 2.5, 2.0], [nan, nan, 2.0, nan], [nan, nan, nan, 3.0]])
  difference = thickness_difference(pred, truth)
  # Both: (0,0) -0.5, (0,2) +0.5, (1,2) 0: the mean difference is a perfect 0 although the
  # prediction misses half of the truth's cartilage: only the coverage shows it.
  assert difference.n_cells == 3 and difference.mean_mm == pytest.approx(0.0)
  coverage = difference.coverage
  assert coverage == ThicknessCoverage(both=3, truth_only=3, pred_only=2)
  assert (coverage.truth_cells, coverage.pred_cells) == (6, 5)
  assert coverage.both_fraction == pytest.approx(3 / 6)
  assert coverage.truth_only_fraction == pytest.approx(3 / 6)
  assert coverage.pred_only_fraction == pytest.approx(2 / 6)


def test_coverage_of_a_missed_plate_and_of_an_empty_truth():
  spacing = (0.8, 0.5, 0.5)
  truth = knee(spacing)
  pred = truth.copy()
  pred[pred == 4] = 0
  tibial = compare_thickness(pred, truth, spacing, tibial_bin_mm=2)['tibial']
  truth_cells = int(np.isfinite(tibial.truth.thickness_mm).sum())
  assert truth_cells > 0
  assert tibial.difference.coverage == ThicknessCoverage(
    both=0, truth_only=truth_cells, pred_only=0
  )
  assert tibial.difference.coverage.truth_only_fraction == 1.0
  # The other way round (no truth cells): counts stay, fractions are undefined.
  empty = ThicknessCoverage(both=0, truth_only=0, pred_only=4)
  assert math.isnan(empty.pred_only_fraction) and math.isnan(empty.both_fraction)


def test_a_difference_built_without_coverage_still_works():
  # Callers that build ThicknessDifference by hand (figures, report tests) need no coverage.
  difference = ThicknessDifference(np.zeros((1, 1)), np.zeros(2), np.zeros(2), 0.0, 0.0, 1)
  assert difference.coverage is None
