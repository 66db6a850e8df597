"""Cartilage thickness maps: the 3D interface thickness of thickness.py flattened to a 2D map
per plate (femur: a cylinder around the condyles; tibia: an axial projection), and the
prediction - truth difference of two maps on one grid.

Input as thickness.py: an integer label map in canonical RAS+ orientation, its spacing in mm
per axis and the label values; positions in "array mm".

Maps: each BCI point gets 2D map coordinates; a map cell holds the mean thickness of the BCI
points that fall into it, NaN where none does.
  femoral      a cylinder is fitted (least squares) to the femoral BCI points with its axis
               near left-right. Rows: angle around the axis in degrees, right-handed about the
               axis (which points to the right): 0 = inferior (distal, weight-bearing),
               +90 = anterior (trochlea side), -90 = posterior, +-180 = superior.
               Columns: position along the axis in mm from the cylinder's centre point.
  tibial       axial projection onto the plateau: rows = anterior position (axis 1, mm),
               columns = rightward position (axis 0, mm), both in array mm.
The mean thickness of a plate is the mean over its filled cells, so every cell (about equal
surface area) weighs the same whatever the voxel shape. Differences are prediction minus
truth, on one grid: compare_thickness fits the cylinder on the truth and uses it for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize

from data_pipelines.tissues import KneeLabelValues
from imask_jax.metrics.overlap import CaseStatus, as_spacing, case_status
from imask_jax.metrics.thickness import (
  DEFAULT_THICKNESS_METHOD,
  InterfaceThickness,
  as_volume,
  check_method,
  interface_thickness,
)

# Robust loss scale (mm) for the cylinder fit: trochlear points off the condylar cylinder
# should not drag the axis.
_CYLINDER_LOSS_SCALE_MM = 2.0


@dataclasses.dataclass(frozen=True)
class Cylinder:
  """A cylinder in array mm: a point on its axis, the unit axis (pointing to +x, i.e.
  rightward), radius, and the RMS of the fit's radial residuals."""

  center_mm: np.ndarray
  axis: np.ndarray
  radius_mm: float
  rms_residual_mm: float


@dataclasses.dataclass(frozen=True)
class ThicknessMap:
  """A flattened thickness map of one plate.

  thickness_mm [n_rows, n_cols]: mean thickness per cell (mm), NaN where no cartilage.
  row_edges [n_rows + 1], col_edges [n_cols + 1]: cell edges in the units of row_name /
  col_name ('angle_deg' and 'axial_mm' for the femur; 'anterior_mm' and 'right_mm' for the
  tibia). mean_thickness_mm: mean over filled cells. points: the 3D thickness it came from.
  cylinder: the projection cylinder (femur only).
  """

  thickness_mm: np.ndarray
  row_edges: np.ndarray
  col_edges: np.ndarray
  row_name: str
  col_name: str
  mean_thickness_mm: float
  points: InterfaceThickness
  cylinder: Cylinder | None = None

  @property
  def row_centers(self) -> np.ndarray:
    return (self.row_edges[:-1] + self.row_edges[1:]) / 2

  @property
  def col_centers(self) -> np.ndarray:
    return (self.col_edges[:-1] + self.col_edges[1:]) / 2


@dataclasses.dataclass(frozen=True)
class ThicknessCoverage:
  """Which cells of two thickness maps on one grid hold cartilage: in both (the cells a
  difference is taken over), only in the truth (cartilage the prediction misses: no
  difference there, so a missed region cannot show in the mean difference), only in the
  prediction (cartilage the truth lacks). Fractions are of the truth's cells (both +
  truth_only), NaN when the truth has none; pred_only_fraction can exceed 1."""

  both: int
  truth_only: int
  pred_only: int

  @property
  def truth_cells(self) -> int:
    return self.both + self.truth_only

  @property
  def pred_cells(self) -> int:
    return self.both + self.pred_only

  @property
  def both_fraction(self) -> float:
    return self.both / self.truth_cells if self.truth_cells else math.nan

  @property
  def truth_only_fraction(self) -> float:
    return self.truth_only / self.truth_cells if self.truth_cells else math.nan

  @property
  def pred_only_fraction(self) -> float:
    return self.pred_only / self.truth_cells if self.truth_cells else math.nan


@dataclasses.dataclass(frozen=True)
class ThicknessDifference:
  """prediction - truth thickness per cell (mm; NaN unless both maps have cartilage there),
  with mean and sample SD over the n_cells compared cells (the paper's Table 5 columns), and
  the coverage of the two maps (None only where a caller built it without)."""

  difference_mm: np.ndarray
  row_edges: np.ndarray
  col_edges: np.ndarray
  mean_mm: float
  sd_mm: float
  n_cells: int
  coverage: ThicknessCoverage | None = None


@dataclasses.dataclass(frozen=True)
class PlateComparison:
  """Truth and prediction maps of one plate on one grid, their difference, and the
  empty-mask status of the plate's cartilage (overlap.py rules)."""

  truth: ThicknessMap
  pred: ThicknessMap
  difference: ThicknessDifference
  status: CaseStatus


# ----------------------------------------------------------------------------- cylinder


def fit_cylinder(points_mm: Any) -> Cylinder:
  """Least-squares cylinder through points [N, 3] (array mm) with its axis near axis 0
  (left-right): a circle fit in the sagittal plane starts a robust (soft-L1) fit of the
  axis direction, axis position and radius."""
  points = np.asarray(points_mm, dtype=float)
  if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] < 6:
    raise ValueError(
      f'fit_cylinder: points have shape {points.shape}; expected [N >= 6, 3] '
      '(e.g. the femoral bone-cartilage interface).'
    )
  x_mean = points[:, 0].mean()
  # Algebraic circle fit y^2 + z^2 + D y + E z + F = 0 in the sagittal plane.
  y, z = points[:, 1], points[:, 2]
  design = np.stack([y, z, np.ones_like(y)], axis=1)
  (d, e, f), *_ = np.linalg.lstsq(design, -(y**2 + z**2), rcond=None)
  center_yz = np.array([-d / 2, -e / 2])
  radius = math.sqrt(max(center_yz @ center_yz - f, 1e-12))

  def unpack(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    tilt_y, tilt_z, center_y, center_z, r = params
    axis = np.array([1.0, tilt_y, tilt_z])
    return np.array([x_mean, center_y, center_z]), axis / np.linalg.norm(axis), r

  def residuals(params: np.ndarray) -> np.ndarray:
    center, axis, r = unpack(params)
    relative = points - center
    radial = relative - np.outer(relative @ axis, axis)
    return np.linalg.norm(radial, axis=1) - r

  start = np.array([0.0, 0.0, center_yz[0], center_yz[1], radius])
  solution = optimize.least_squares(
    residuals, start, loss='soft_l1', f_scale=_CYLINDER_LOSS_SCALE_MM
  )
  center, axis, r = unpack(solution.x)
  rms = float(np.sqrt(np.mean(residuals(solution.x) ** 2)))
  return Cylinder(center_mm=center, axis=axis, radius_mm=float(abs(r)), rms_residual_mm=rms)


def cylinder_coordinates(
  points_mm: np.ndarray, cylinder: Cylinder
) -> tuple[np.ndarray, np.ndarray]:
  """(angle_deg, axial_mm) of points [N, 3] around `cylinder` (convention in the module
  docstring: 0 deg inferior, +90 anterior, right-handed about the rightward axis)."""
  axis = cylinder.axis
  inferior = np.array([0.0, 0.0, -1.0])
  inferior = inferior - (inferior @ axis) * axis
  inferior /= np.linalg.norm(inferior)
  anterior = np.cross(axis, inferior)
  relative = np.asarray(points_mm, dtype=float) - cylinder.center_mm
  angle = np.degrees(np.arctan2(relative @ anterior, relative @ inferior))
  return angle, relative @ axis


# ----------------------------------------------------------------------------- maps


def femoral_thickness_map(
  label_map: Any,
  spacing: Sequence[float],
  *,
  labels: KneeLabelValues = KneeLabelValues(),
  cylinder: Cylinder | None = None,
  angle_bin_deg: float = 1.0,
  axial_bin_mm: float | None = None,
  axial_range_mm: tuple[float, float] | None = None,
  method: str = DEFAULT_THICKNESS_METHOD,
) -> ThicknessMap:
  """Femoral cartilage map: rows = angle (deg, -180..180), cols = position along the
  cylinder axis (mm). `cylinder` defaults to the fit on this label map's femoral BCI;
  `axial_bin_mm` to 1 mm or the left-right spacing if coarser (no column between slices);
  `axial_range_mm` to the data's extent; `method` is interface_thickness's."""
  where = 'femoral_thickness_map'
  points = interface_thickness(
    label_map, spacing, labels.femur, labels.femoral_cartilage, method=method
  )
  if cylinder is None:
    if len(points.thickness_mm) < 6:
      raise ValueError(
        f'{where}: femoral cartilage (label {labels.femoral_cartilage}) touches '
        f'the femur (label {labels.femur}) at {len(points.thickness_mm)} faces; '
        'need at least 6 to fit the projection cylinder.'
      )
    cylinder = fit_cylinder(points.positions_mm)
  if axial_bin_mm is None:
    axial_bin_mm = _default_bin_mm(spacing, axes=(0,), where=where)
  return _femoral_map(points, cylinder, angle_bin_deg, axial_bin_mm, axial_range_mm, where)


def _femoral_map(
  points: InterfaceThickness,
  cylinder: Cylinder,
  angle_bin_deg: float,
  axial_bin_mm: float,
  axial_range_mm: tuple[float, float] | None,
  where: str,
) -> ThicknessMap:
  angle, axial = cylinder_coordinates(points.positions_mm, cylinder)
  row_edges = _edges((-180.0, 180.0), angle_bin_deg, 'angle_bin_deg', where, centred=False)
  col_edges = _edges(axial_range_mm or _extent(axial), axial_bin_mm, 'axial_bin_mm', where)
  return _make_map(points, angle, axial, row_edges, col_edges, 'angle_deg', 'axial_mm', cylinder)


def tibial_thickness_map(
  label_map: Any,
  spacing: Sequence[float],
  *,
  labels: KneeLabelValues = KneeLabelValues(),
  bin_mm: float | None = None,
  anterior_range_mm: tuple[float, float] | None = None,
  right_range_mm: tuple[float, float] | None = None,
  method: str = DEFAULT_THICKNESS_METHOD,
) -> ThicknessMap:
  """Tibial cartilage map, projected axially: rows = anterior position (axis 1, mm), cols =
  rightward position (axis 0, mm). `bin_mm` defaults to 1 mm or the coarsest spacing of axes
  0 and 1 (no empty rows or columns between voxels); ranges to the data's extent; `method` is
  interface_thickness's."""
  where = 'tibial_thickness_map'
  points = interface_thickness(
    label_map, spacing, labels.tibia, labels.tibial_cartilage, method=method
  )
  if bin_mm is None:
    bin_mm = _default_bin_mm(spacing, axes=(0, 1), where=where)
  return _tibial_map(points, bin_mm, anterior_range_mm, right_range_mm, where)


def _tibial_map(
  points: InterfaceThickness,
  bin_mm: float,
  anterior_range_mm: tuple[float, float] | None,
  right_range_mm: tuple[float, float] | None,
  where: str,
) -> ThicknessMap:
  anterior, right = points.positions_mm[:, 1], points.positions_mm[:, 0]
  row_edges = _edges(anterior_range_mm or _extent(anterior), bin_mm, 'bin_mm', where)
  col_edges = _edges(right_range_mm or _extent(right), bin_mm, 'bin_mm', where)
  return _make_map(points, anterior, right, row_edges, col_edges, 'anterior_mm', 'right_mm')


def thickness_difference(pred: ThicknessMap, truth: ThicknessMap) -> ThicknessDifference:
  """pred - truth per cell of two maps on the same grid, with mean and SD over the cells
  where both have cartilage, and the coverage (cells with cartilage in both, only the truth,
  only the prediction)."""
  if not (
    np.array_equal(pred.row_edges, truth.row_edges)
    and np.array_equal(pred.col_edges, truth.col_edges)
  ):
    raise ValueError(
      'thickness_difference: the maps have different grids (rows '
      f'{pred.row_edges[[0, -1]]} vs {truth.row_edges[[0, -1]]}, '
      f'{pred.row_edges.size - 1} vs {truth.row_edges.size - 1} cells; cols '
      f'{pred.col_edges[[0, -1]]} vs {truth.col_edges[[0, -1]]}); build both with the same '
      'cylinder and ranges, e.g. with compare_thickness.'
    )
  difference = pred.thickness_mm - truth.thickness_mm
  values = difference[np.isfinite(difference)]
  in_pred, in_truth = np.isfinite(pred.thickness_mm), np.isfinite(truth.thickness_mm)
  coverage = ThicknessCoverage(
    both=int(np.sum(in_pred & in_truth)),
    truth_only=int(np.sum(in_truth & ~in_pred)),
    pred_only=int(np.sum(in_pred & ~in_truth)),
  )
  return ThicknessDifference(
    difference_mm=difference,
    row_edges=truth.row_edges,
    col_edges=truth.col_edges,
    mean_mm=float(values.mean()) if values.size else math.nan,
    sd_mm=float(values.std(ddof=1)) if values.size > 1 else math.nan,
    n_cells=int(values.size),
    coverage=coverage,
  )


def compare_thickness(
  pred_labels: Any,
  truth_labels: Any,
  spacing: Sequence[float],
  *,
  labels: KneeLabelValues = KneeLabelValues(),
  angle_bin_deg: float = 1.0,
  axial_bin_mm: float | None = None,
  tibial_bin_mm: float | None = None,
  method: str = DEFAULT_THICKNESS_METHOD,
) -> dict[str, PlateComparison]:
  """Femoral and tibial maps of prediction and truth on shared grids (the cylinder fitted on
  the truth, ranges covering both), with prediction - truth differences.

  Returns {'femoral': PlateComparison, 'tibial': PlateComparison}. A plate whose cartilage the
  truth lacks raises; one the prediction lacks gives an all-NaN prediction map, a difference
  with n_cells 0, and status MISSED. Bin sizes default as in femoral_thickness_map and
  tibial_thickness_map; `method` ('nearest' or 'normal') is interface_thickness's, the same
  for both label maps.
  """
  where = 'compare_thickness'
  pred_labels = as_volume(pred_labels, where)
  truth_labels = as_volume(truth_labels, where)
  if pred_labels.shape != truth_labels.shape:
    raise ValueError(
      f'{where}: prediction shape {pred_labels.shape} differs from truth shape '
      f'{truth_labels.shape}; both must be on the same voxel grid.'
    )
  spacing = as_spacing(spacing, 3, where)
  check_method(method, f'{where}: method')
  if axial_bin_mm is None:
    axial_bin_mm = _default_bin_mm(spacing, axes=(0,), where=where)
  if tibial_bin_mm is None:
    tibial_bin_mm = _default_bin_mm(spacing, axes=(0, 1), where=where)
  plates = {
    'femoral': (labels.femur, labels.femoral_cartilage),
    'tibial': (labels.tibia, labels.tibial_cartilage),
  }
  result = {}
  for plate, (bone, cartilage) in plates.items():
    truth_points = interface_thickness(truth_labels, spacing, bone, cartilage, method=method)
    pred_points = interface_thickness(pred_labels, spacing, bone, cartilage, method=method)
    if len(truth_points.thickness_mm) == 0:
      raise ValueError(
        f'{where}: the truth has no {plate} cartilage (label {cartilage}) on '
        f'its bone (label {bone}); there is no thickness to compare with.'
      )
    both = np.concatenate([truth_points.positions_mm, pred_points.positions_mm])
    if plate == 'femoral':
      cylinder = fit_cylinder(truth_points.positions_mm)
      axial_range = _extent(cylinder_coordinates(both, cylinder)[1])
      truth_map, pred_map = (
        _femoral_map(points, cylinder, angle_bin_deg, axial_bin_mm, axial_range, where)
        for points in (truth_points, pred_points)
      )
    else:
      anterior_range, right_range = _extent(both[:, 1]), _extent(both[:, 0])
      truth_map, pred_map = (
        _tibial_map(points, tibial_bin_mm, anterior_range, right_range, where)
        for points in (truth_points, pred_points)
      )
    result[plate] = PlateComparison(
      truth=truth_map,
      pred=pred_map,
      difference=thickness_difference(pred_map, truth_map),
      status=case_status(len(pred_points.thickness_mm), len(truth_points.thickness_mm)),
    )
  return result


# ----------------------------------------------------------------------------- helpers


def _make_map(
  points: InterfaceThickness,
  rows: np.ndarray,
  cols: np.ndarray,
  row_edges: np.ndarray,
  col_edges: np.ndarray,
  row_name: str,
  col_name: str,
  cylinder: Cylinder | None = None,
) -> ThicknessMap:
  """Mean thickness of the points per (row, col) cell; NaN in empty cells."""
  shape = (row_edges.size - 1, col_edges.size - 1)
  row_index = np.searchsorted(row_edges, rows, side='right') - 1
  col_index = np.searchsorted(col_edges, cols, side='right') - 1
  # The last edge belongs to the last cell (e.g. +180 deg, or the far end of the range).
  row_index[rows == row_edges[-1]] = shape[0] - 1
  col_index[cols == col_edges[-1]] = shape[1] - 1
  inside = (row_index >= 0) & (row_index < shape[0]) & (col_index >= 0) & (col_index < shape[1])
  flat = np.ravel_multi_index((row_index[inside], col_index[inside]), shape)
  total = np.bincount(flat, weights=points.thickness_mm[inside], minlength=math.prod(shape))
  count = np.bincount(flat, minlength=math.prod(shape))
  with np.errstate(invalid='ignore', divide='ignore'):
    thickness = np.where(count > 0, total / count, np.nan).reshape(shape)
  filled = thickness[np.isfinite(thickness)]
  return ThicknessMap(
    thickness_mm=thickness,
    row_edges=row_edges,
    col_edges=col_edges,
    row_name=row_name,
    col_name=col_name,
    mean_thickness_mm=float(filled.mean()) if filled.size else math.nan,
    points=points,
    cylinder=cylinder,
  )


def _default_bin_mm(spacing: Sequence[float], axes: tuple[int, ...], where: str) -> float:
  """1 mm, or the coarsest spacing along the map's axes if that is coarser, so no row or
  column of the map falls between two voxel layers and stays empty."""
  spacing = as_spacing(spacing, 3, where)
  return max(1.0, *(spacing[axis] for axis in axes))


def _edges(
  value_range: tuple[float, float], step: float, step_name: str, where: str, *, centred: bool = True
) -> np.ndarray:
  """Cell edges covering value_range with cells `step` wide. Centred: cell centres at whole
  multiples of step, so voxel positions (multiples of the spacing) fall mid-cell rather than
  on an edge where rounding could move them; otherwise edges at whole multiples."""
  if not (math.isfinite(step) and step > 0):
    raise ValueError(f'{where}: {step_name}={step!r}; expected a positive bin size.')
  low, high = value_range
  if not (math.isfinite(low) and math.isfinite(high) and low <= high):
    raise ValueError(f'{where}: range ({low}, {high}) must be finite with low <= high.')
  shift = 0.5 if centred else 0.0
  first = math.floor(low / step + shift + 1e-9)
  last = max(math.ceil(high / step + shift - 1e-9), first + 1)
  return (np.arange(first, last + 1) - shift) * step


def _extent(values: np.ndarray) -> tuple[float, float]:
  """(min, max) of values; (0, 0) when there are none (a map with one empty cell)."""
  return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


# About one degree of arc on a femoral condyle of 23 mm radius (the paper's 1 deg map rows).
ARC_MM_PER_DEGREE = 0.4


def femoral_angle_bin_deg(spacing: Sequence[float]) -> float:
  """Row height (degrees) of femoral thickness maps for canonical `spacing` (mm): the paper's
  1 deg while the sagittal in-plane voxels (axes 1 and 2) are at most ARC_MM_PER_DEGREE, else
  the whole number of degrees one voxel spans, so that no map row falls between two voxel
  layers and stays empty."""
  in_plane = max(float(spacing[1]), float(spacing[2]))
  # The tolerance keeps float32 spacings such as 0.800000012 from rounding up a whole degree.
  return float(max(1, math.ceil(in_plane / ARC_MM_PER_DEGREE - 1e-4)))
