"""Canonical orientation (RAS+) and slicing along anatomical planes.

Conventions
-----------
Canonical arrays are indexed [X, Y, Z] with X increasing toward the patient's Right, Y toward
Anterior, Z toward Superior (RAS+, nibabel's closest-axis reorientation; no resampling, so the
round trip back to the file's grid is exact). Spacing is in mm, in the canonical axis order.

2D slices are [H, W] = [rows, columns], row 0 at the top of the displayed image:

  plane     slices along (index 0 ->)   rows (top -> bottom)    columns (left -> right)
  sagittal  X (patient left -> right)   superior -> inferior    anterior -> posterior
  coronal   Y (posterior -> anterior)   superior -> inferior    patient right -> left
  axial     Z (inferior -> superior)    anterior -> posterior   patient right -> left

Sagittal slices show the patient facing left (anterior at the left edge), coronal and axial
slices use the radiological convention (patient's right on the viewer's left); every plane is
upright (superior, or anterior for axial, at the top).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from nibabel import orientations as ornts

CANONICAL_AXCODES = ('R', 'A', 'S')
PLANES = ('sagittal', 'coronal', 'axial')


@dataclasses.dataclass(frozen=True)
class PlaneAxes:
  """Which canonical axis is the slice axis, the row axis and the column axis of a plane, and
  whether rows / columns run against the canonical axis direction."""

  slice_axis: int
  row_axis: int
  row_flip: bool
  col_axis: int
  col_flip: bool


PLANE_AXES = {
  # Rows run S -> I, i.e. against +Z; columns A -> P, against +Y.
  'sagittal': PlaneAxes(slice_axis=0, row_axis=2, row_flip=True, col_axis=1, col_flip=True),
  # Rows S -> I; columns patient right -> left, against +X.
  'coronal': PlaneAxes(slice_axis=1, row_axis=2, row_flip=True, col_axis=0, col_flip=True),
  # Rows A -> P, against +Y; columns right -> left, against +X.
  'axial': PlaneAxes(slice_axis=2, row_axis=1, row_flip=True, col_axis=0, col_flip=True),
}


def plane_axes(plane: str) -> PlaneAxes:
  if plane not in PLANE_AXES:
    raise ValueError(f'unknown plane {plane!r}; expected one of {PLANES}')
  return PLANE_AXES[plane]


@dataclasses.dataclass(frozen=True, eq=False)
class SourceGrid:
  """A volume's original voxel grid and the exact (permute/flip) map to canonical RAS+.

  shape: the original spatial shape [I, J, K]; affine: original voxel -> RAS+ mm [4, 4];
  to_canonical_ornt / to_original_ornt: nibabel orientation arrays [3, 2] for each direction.
  """

  shape: tuple[int, int, int]
  affine: np.ndarray
  to_canonical_ornt: np.ndarray
  to_original_ornt: np.ndarray

  @classmethod
  def from_affine(cls, shape: Sequence[int], affine: np.ndarray) -> SourceGrid:
    shape = tuple(int(n) for n in shape[:3])
    affine = np.array(affine, dtype=np.float64)
    affine.setflags(write=False)
    source = ornts.io_orientation(affine)
    canonical = ornts.axcodes2ornt(CANONICAL_AXCODES)
    forward = ornts.ornt_transform(source, canonical)
    backward = ornts.ornt_transform(canonical, source)
    forward.setflags(write=False)
    backward.setflags(write=False)
    return cls(shape, affine, forward, backward)

  @property
  def axcodes(self) -> tuple[str, ...]:
    """Anatomical direction of each original array axis, e.g. ('P', 'I', 'L')."""
    return tuple(ornts.aff2axcodes(self.affine))

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    return tuple(self.shape[int(axis)] for axis in self.to_original_ornt[:, 0])

  @property
  def canonical_affine(self) -> np.ndarray:
    """Canonical voxel index -> RAS+ mm, the same world points as the original grid."""
    return self.affine @ ornts.inv_ornt_aff(self.to_canonical_ornt, self.shape)

  @property
  def canonical_spacing(self) -> tuple[float, float, float]:
    """Voxel size in mm along canonical X, Y, Z."""
    return tuple(float(z) for z in np.linalg.norm(self.canonical_affine[:3, :3], axis=0))

  def to_canonical(self, array: np.ndarray) -> np.ndarray:
    """[I, J, K, ...] on the original grid -> [X, Y, Z, ...] canonical (trailing axes kept)."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != self.shape:
      raise ValueError(f'array shape {array.shape[:3]} does not match the source grid {self.shape}')
    return np.ascontiguousarray(ornts.apply_orientation(array, self.to_canonical_ornt))

  def to_original(self, array: np.ndarray) -> np.ndarray:
    """[X, Y, Z, ...] canonical -> [I, J, K, ...] on the original grid, exactly."""
    array = np.asarray(array)
    if tuple(array.shape[:3]) != self.canonical_shape:
      raise ValueError(
        f'array shape {array.shape[:3]} does not match the canonical shape {self.canonical_shape}'
      )
    return np.ascontiguousarray(ornts.apply_orientation(array, self.to_original_ornt))


def volume_to_slices(volume: np.ndarray, plane: str) -> np.ndarray:
  """Canonical [X, Y, Z, ...] -> upright slices [n, H, W, ...] along `plane` (see module doc)."""
  axes = plane_axes(plane)
  volume = np.asarray(volume)
  if volume.ndim < 3:
    raise ValueError(f'expected a volume [X, Y, Z, ...], got shape {volume.shape}')
  order = (axes.slice_axis, axes.row_axis, axes.col_axis) + tuple(range(3, volume.ndim))
  stack = np.transpose(volume, order)
  flips = tuple(a for a, f in ((1, axes.row_flip), (2, axes.col_flip)) if f)
  return np.ascontiguousarray(np.flip(stack, flips))


def slices_to_volume(stack: np.ndarray, plane: str) -> np.ndarray:
  """Inverse of `volume_to_slices`: [n, H, W, ...] -> canonical [X, Y, Z, ...]."""
  axes = plane_axes(plane)
  stack = np.asarray(stack)
  if stack.ndim < 3:
    raise ValueError(f'expected slices [n, H, W, ...], got shape {stack.shape}')
  flips = tuple(a for a, f in ((1, axes.row_flip), (2, axes.col_flip)) if f)
  stack = np.flip(stack, flips)
  order = (axes.slice_axis, axes.row_axis, axes.col_axis) + tuple(range(3, stack.ndim))
  return np.ascontiguousarray(np.transpose(stack, np.argsort(order)))


def pixel_spacing(spacing: Sequence[float], plane: str) -> tuple[float, float]:
  """(row_mm, col_mm) of a slice, from canonical spacing [X, Y, Z] in mm: the distance between
  the centres of neighbouring rows and of neighbouring columns."""
  axes = plane_axes(plane)
  return float(spacing[axes.row_axis]), float(spacing[axes.col_axis])


def slice_thickness(spacing: Sequence[float], plane: str) -> float:
  """Distance in mm between neighbouring slice centres (the voxel size along the slice axis;
  not the DICOM SliceThickness, which may differ when slices overlap or have gaps)."""
  return float(spacing[plane_axes(plane).slice_axis])
