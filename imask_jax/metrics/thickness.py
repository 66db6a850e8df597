"""Cartilage thickness from knee label maps: 3D thickness (mm) at every bone-cartilage interface
point of a plate, by two measures ('nearest', 'normal').

Input: an integer label map in canonical RAS+ orientation (axis 0 left -> right, axis 1
posterior -> anterior, axis 2 inferior -> superior), its spacing in mm per axis, and the label
values (OAI-ZIB by default: femur 1, femoral cartilage 2, tibia 3, tibial cartilage 4).
Positions are in "array mm": voxel (i, j, k) has its centre at (i, j, k) * spacing.

Thickness (docs/metrics.md has the reasoning and the measured accuracy):
  interfaces   are taken at voxel faces, not voxel centres, so a cartilage layer n voxels
               thick along an axis measures n voxels, not n - 1:
               bone-cartilage interface (BCI): centres of the faces shared by a cartilage
                 voxel and a voxel of its bone;
               articular surface: centres of the faces shared by a cartilage voxel and a
                 voxel of any other label (background, fluid, the other plate's cartilage).
                 Faces on the array's edge are neither: a cut field of view is not a surface.
  thickness    method='nearest': at each BCI point, the Euclidean distance (mm)
               to the nearest articular-surface point (minimal distance from the bone side; the
               paper measures "the distance between the cartilage bony surface and the
               articular [surface]"), found with a k-d tree over the surface points. It reads
               low on staircase surfaces (docs/results/thickness_measure.md).
               method='normal' (the default): the 3D surface-normal method. The bone
               indicator and the bone-or-cartilage indicator are smoothed with a Gaussian
               (isotropic, SD the coarsest spacing by default); their 0.5 iso-surfaces
               (trilinear) are the
               sub-voxel BCI and articular surface. Each BCI face centre is moved onto the
               smoothed BCI, and the thickness is the distance (mm) along the BCI's outward
               normal (the gradient of the bone indicator smoothed twice as much) to where the
               ray leaves the cartilage: the articular surface, or bone again.

The flattened maps of these points (femoral cylinder, tibial projection) and their
differences are thickness_maps.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, spatial

from imask_jax.metrics.overlap import as_label_map, as_spacing

# Thickness methods (module docstring). The default, here and in the config
# (eval.thickness_method), is the staircase-robust surface-normal method; 'nearest' reads voxel
# staircases thin by an amount that depends on the grid (docs/results/thickness_measure.md).
THICKNESS_METHODS = ('nearest', 'normal')
DEFAULT_THICKNESS_METHOD = 'normal'
# Surface-normal method. Farthest a ray from the BCI is followed (mm): cartilage is at most
# about 5 mm thick, a ray near a plate's rim can run obliquely for longer; one that stays in
# the cartilage that far is dropped.
_NORMAL_REACH_MM = 12.0
# Newton steps that move a BCI face centre onto the smoothed interface (each step at most one
# voxel; face centres lie within about half a voxel of it, so 4 steps converge).
_PROJECTION_STEPS = 4
# Normals come from the bone indicator smoothed this many times more: a surface a few degrees
# off a voxel axis is a staircase of flat terraces several voxels wide, on which the smoothed
# surface's own normal is the axis, and a ray along the axis reads T / cos(tilt) (+3 % at 14
# deg). Twice the SD (2 voxels) damps a terrace pattern 4 voxels wide to under 1 % of its
# amplitude (exp(-2 pi^2 s^2 / w^2)); spheres and cylinders keep their radial normals whatever
# the smoothing. Measured on 2 mm slabs tilted 3-45 deg: within 0.021 mm (up to 0.09 mm with
# the surfaces' own normals).
_NORMAL_SMOOTHING_FACTOR = 2.0
# Ray march: coarse steps of this fraction of the finest spacing, then bisection steps.
_RAY_STEP_FRACTION = 0.25
_BISECTION_STEPS = 12
_SEGMENT_STEPS = 24
# Points per ray-march batch (memory: batch x steps x 3 floats).
_RAY_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class InterfaceThickness:
  """Thickness at each bone-cartilage interface point: positions_mm [N, 3] (array mm),
  thickness_mm [N]."""

  positions_mm: np.ndarray
  thickness_mm: np.ndarray


# ----------------------------------------------------------------------------- 3D thickness


def interface_thickness(
  label_map: Any,
  spacing: Sequence[float],
  bone_label: int,
  cartilage_label: int,
  *,
  method: str = DEFAULT_THICKNESS_METHOD,
  smoothing_mm: float | Sequence[float] | None = None,
) -> InterfaceThickness:
  """Cartilage thickness (mm) at every bone-cartilage interface face of one plate.

  method 'normal' (the default): positions are the BCI face centres moved onto the smoothed
  BCI, thickness the distance along its normal to the smoothed articular surface (module
  docstring); `smoothing_mm` is the Gaussian's SD in mm, one value or one per axis (default:
  default_smoothing_mm(spacing), the coarsest spacing on every axis; the normals use an
  isotropic SD twice the largest). method 'nearest': positions are the BCI face centres
  [N, 3] (array mm), thickness the distance to the nearest articular face centre; it does not
  use `smoothing_mm`. A ray still inside the cartilage after _NORMAL_REACH_MM drops its
  point (none does on the phantoms' truth maps).
  """
  where = 'interface_thickness'
  label_map = as_volume(label_map, where)
  spacing = np.asarray(as_spacing(spacing, 3, where))
  check_method(method, f'{where}: method')
  if bone_label == cartilage_label:
    raise ValueError(
      f'{where}: bone_label and cartilage_label are both {bone_label}; '
      'expected two different label values.'
    )
  interface, articular = _interface_faces(label_map, spacing, bone_label, cartilage_label)
  if len(interface) == 0 or len(articular) == 0:
    return InterfaceThickness(np.zeros((0, 3)), np.zeros((0,)))
  if method == 'normal':
    sigma_mm = _smoothing(smoothing_mm, spacing, where)
    return _normal_thickness(label_map, spacing, bone_label, cartilage_label, interface, sigma_mm)
  distances, _ = spatial.cKDTree(articular).query(interface)
  return InterfaceThickness(interface, distances)


def default_smoothing_mm(spacing: Sequence[float]) -> np.ndarray:
  """The surface-normal method's Gaussian SD per axis (mm) for `spacing` (mm per axis)."""
  spacing = np.asarray(as_spacing(spacing, 3, 'default_smoothing_mm'))
  return _default_smoothing(spacing)


def _default_smoothing(spacing: np.ndarray) -> np.ndarray:
  """One isotropic SD (mm) for all axes: the coarsest spacing. Isotropic, so the smoothed
  surfaces do not depend on how the anatomy lies in the voxel grid; as coarse as the coarsest
  axis, because a surface nearly across that axis is a staircase of terraces many fine voxels
  wide, which a one-voxel SD along the fine axes leaves in place (+0.03 to +0.09 mm on a 2 mm
  slab tilted 14 deg off the 0.7 mm or 1.5 mm axis). The cost: thin plates round off within
  about one SD of their rim (docs/results/thickness_measure.md)."""
  return np.full(3, float(np.max(spacing)))


def check_method(method: Any, where: str) -> str:
  """`method` as a string, refused unless one of THICKNESS_METHODS, in the message
  '<where>=<method>; expected one of ...'. `where` names the setting: a function's argument
  ('interface_thickness: method') or a config field ('config eval.thickness_method', checked
  before anything is measured, since a wrong name would otherwise surface only as a 'not
  measured' note per case; the caller reads the config, not this module)."""
  method = str(method)
  if method not in THICKNESS_METHODS:
    raise ValueError(f'{where}={method!r}; expected one of {THICKNESS_METHODS}')
  return method


def _smoothing(
  smoothing_mm: float | Sequence[float] | None, spacing: np.ndarray, where: str
) -> np.ndarray:
  """Gaussian SD per axis (mm): the default rule, or the caller's one value or three."""
  if smoothing_mm is None:
    return _default_smoothing(spacing)
  sigma = (
    np.broadcast_to(np.asarray(smoothing_mm, dtype=float).reshape(-1), (3,))
    if np.size(smoothing_mm) in (1, 3)
    else None
  )
  if sigma is None or not np.all(np.isfinite(sigma) & (sigma > 0)):
    raise ValueError(
      f'{where}: smoothing_mm={smoothing_mm!r}; expected one positive SD in mm or one per axis.'
    )
  return np.array(sigma, dtype=float)


def _normal_thickness(
  label_map: np.ndarray,
  spacing: np.ndarray,
  bone: int,
  cartilage: int,
  faces_mm: np.ndarray,
  sigma_mm: np.ndarray,
) -> InterfaceThickness:
  """The surface-normal method from the BCI face centres faces_mm [N, 3] (array mm)."""
  sigma = sigma_mm / spacing  # voxels per axis
  # The fields must be exact up to a voxel beyond the cartilage: crop with 4 SDs to spare.
  margin = int(math.ceil(4 * _NORMAL_SMOOTHING_FACTOR * sigma_mm.max() / spacing.min())) + 2
  crop, offset = _bounding_box(label_map == cartilage, margin=margin)
  labels = label_map[crop]
  is_bone = labels == bone
  bone_field = ndimage.gaussian_filter(is_bone.astype(np.float32), sigma, mode='nearest')
  # Normals: isotropic in mm, twice the largest SD (constant comment above).
  normal_sigma = _NORMAL_SMOOTHING_FACTOR * sigma_mm.max() / spacing
  normal_field = ndimage.gaussian_filter(is_bone.astype(np.float32), normal_sigma, mode='nearest')
  union_field = ndimage.gaussian_filter(
    (is_bone | (labels == cartilage)).astype(np.float32), sigma, mode='nearest'
  )
  origin = offset * spacing
  points = faces_mm.copy()
  for _ in range(_PROJECTION_STEPS):
    value, gradient = _value_and_gradient(bone_field, points, origin, spacing)
    step = ((value - 0.5) / np.maximum(np.sum(gradient**2, axis=1), 1e-12))[:, None] * gradient
    length = np.linalg.norm(step, axis=1, keepdims=True)
    points -= step * np.minimum(1.0, spacing.min() / np.maximum(length, 1e-12))
  _, gradient = _value_and_gradient(normal_field, points, origin, spacing)
  norm = np.linalg.norm(gradient, axis=1, keepdims=True)
  normals = -gradient / np.maximum(norm, 1e-12)  # outward: away from the bone
  thickness = np.concatenate(
    [
      _ray_exit(
        bone_field,
        union_field,
        points[i : i + _RAY_BATCH],
        normals[i : i + _RAY_BATCH],
        origin,
        spacing,
      )
      for i in range(0, len(points), _RAY_BATCH)
    ]
  )
  keep = np.isfinite(thickness) & (norm[:, 0] > 0)
  return InterfaceThickness(points[keep], thickness[keep])


def _sample(
  field: np.ndarray, points_mm: np.ndarray, origin: np.ndarray, spacing: np.ndarray
) -> np.ndarray:
  """Trilinear interpolation of `field` (a crop whose voxel 0 is at origin mm) at points
  [..., 3] (array mm); the edge values continue beyond the crop."""
  index = ((points_mm - origin) / spacing).reshape(-1, 3).T
  values = ndimage.map_coordinates(field, index, order=1, mode='nearest')
  return values.reshape(points_mm.shape[:-1]).astype(float)


def _value_and_gradient(
  field: np.ndarray, points_mm: np.ndarray, origin: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Field value [N] and gradient [N, 3] (per mm; central differences half a voxel each way,
  smooth across the interpolation cells) at points [N, 3] (array mm)."""
  value = _sample(field, points_mm, origin, spacing)
  gradient = np.empty_like(points_mm)
  for axis in range(3):
    half = np.zeros(3)
    half[axis] = spacing[axis] / 2
    gradient[:, axis] = (
      _sample(field, points_mm + half, origin, spacing)
      - _sample(field, points_mm - half, origin, spacing)
    ) / spacing[axis]
  return value, gradient


def _ray_exit(
  bone_field: np.ndarray,
  union_field: np.ndarray,
  points: np.ndarray,
  normals: np.ndarray,
  origin: np.ndarray,
  spacing: np.ndarray,
) -> np.ndarray:
  """Distance (mm) along each normal from points [N, 3] to where the ray leaves the
  cartilage: the bone-or-cartilage field falls below 0.5 (the articular surface) or the bone
  field rises above 0.5 (bone again). NaN where the ray is still inside at _NORMAL_REACH_MM.
  Coarse steps find the first sample outside, bisection the crossing within that step."""
  step = _RAY_STEP_FRACTION * spacing.min()
  n_steps = int(math.ceil(_NORMAL_REACH_MM / step))

  def outside(rows: np.ndarray, distances: np.ndarray) -> np.ndarray:
    at = points[rows, None, :] + distances[..., None] * normals[rows, None, :]
    return (_sample(union_field, at, origin, spacing) < 0.5) | (
      _sample(bone_field, at, origin, spacing) > 0.5
    )

  result = np.full(len(points), np.nan)
  active = np.arange(len(points))
  # Segments of _SEGMENT_STEPS samples: most rays leave in the first or second, so the rest of
  # the reach is sampled only for the few that have not.
  for first_step in range(0, n_steps, _SEGMENT_STEPS):
    if active.size == 0:
      break
    index = np.arange(first_step, min(first_step + _SEGMENT_STEPS, n_steps)) + 1
    crossed = outside(active, np.broadcast_to(index * step, (active.size, index.size)))
    hit = crossed.any(axis=1)
    rows = active[hit]
    high = index[np.argmax(crossed[hit], axis=1)] * step  # first sample outside
    low = high - step  # the last one inside (the start point for the first)
    for _ in range(_BISECTION_STEPS):
      middle = (low + high) / 2
      out = outside(rows, middle[:, None])[:, 0]
      high = np.where(out, middle, high)
      low = np.where(out, low, middle)
    result[rows] = (low + high) / 2
    active = active[~hit]
  return result


def _interface_faces(
  label_map: np.ndarray, spacing: np.ndarray, bone: int, cartilage: int
) -> tuple[np.ndarray, np.ndarray]:
  """Centres (array mm) of bone-cartilage faces [N, 3] and articular faces [M, 3]."""
  is_cartilage = label_map == cartilage
  if not is_cartilage.any():
    return np.zeros((0, 3)), np.zeros((0, 3))
  # Only faces of cartilage voxels matter: crop to the cartilage box grown by one voxel.
  crop, offset = _bounding_box(is_cartilage, margin=1)
  labels = label_map[crop]
  is_cartilage = is_cartilage[crop]
  is_bone = labels == bone
  interface, articular = [], []
  for axis in range(3):
    low = [slice(None)] * 3
    high = [slice(None)] * 3
    low[axis], high[axis] = slice(0, -1), slice(1, None)
    low, high = tuple(low), tuple(high)
    cartilage_low, cartilage_high = is_cartilage[low], is_cartilage[high]
    bone_low, bone_high = is_bone[low], is_bone[high]
    bone_face = (cartilage_low & bone_high) | (bone_low & cartilage_high)
    other_low = ~(cartilage_low | bone_low)
    other_high = ~(cartilage_high | bone_high)
    articular_face = (cartilage_low & other_high) | (other_low & cartilage_high)
    half_step = np.zeros(3)
    half_step[axis] = 0.5
    for faces, out in ((bone_face, interface), (articular_face, articular)):
      index = np.argwhere(faces).astype(float)
      out.append((index + offset + half_step) * spacing)
  return np.concatenate(interface), np.concatenate(articular)


# ----------------------------------------------------------------------------- helpers


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[tuple[slice, ...], np.ndarray]:
  """Slices of mask's bounding box grown by margin (clipped) and the box's start index."""
  crop = []
  for axis, size in enumerate(mask.shape):
    others = tuple(i for i in range(mask.ndim) if i != axis)
    occupied = np.flatnonzero(np.any(mask, axis=others))
    crop.append(slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, size)))
  return tuple(crop), np.array([s.start for s in crop], dtype=float)


def as_volume(label_map: Any, where: str) -> np.ndarray:
  """`label_map` as an integer 3D array, or a ValueError naming `where`."""
  label_map = as_label_map(label_map, 'label_map', where)
  if label_map.ndim != 3:
    raise ValueError(
      f'{where}: label_map has shape {label_map.shape}; expected a 3D label '
      'map in RAS+ orientation (left->right, posterior->anterior, '
      'inferior->superior).'
    )
  return label_map
