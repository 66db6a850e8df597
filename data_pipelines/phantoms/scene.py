"""Voxel grid, cached SDF fields and the layered partial-volume renderer shared by the phantoms.

A phantom is a list of tissue layers in priority order (the first wins where two overlap), each
an SDF in a continuous model frame (mm) plus an intensity. `render` evaluates every layer only
inside its bounding box, labels each voxel by the highest-priority tissue containing its
centre, and mixes intensities by partial-volume fractions: for an ordinary layer the fraction
is a linear ramp of width `ramp_mm` across the SDF of its *visible* part (the layer minus all
higher layers), which makes the fractions of two tissues sharing a boundary add up to one; thin
shells (cartilage) give their fraction explicitly.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

Array = np.ndarray
Box = tuple[tuple[float, float, float], tuple[float, float, float]]
Slices = tuple[slice, slice, slice]
FAR = np.float32(1e4)  # "very far outside", used where a field was not evaluated


@dataclasses.dataclass
class Phantom:
  """One generated volume.

  image: float32 [X, Y, Z] signal in scanner-like units (integer valued, stored as int16).
  labels: uint8 [X, Y, Z] truth label map.
  affine: float64 [4, 4] voxel index -> world RAS mm.
  reader_labels: name -> uint8 [X, Y, Z] label maps of simulated human readers (hip only).
  truth: the JSON-serialisable sidecar (volumes, thickness fields, geometry, seed, ...).
  """

  image: Array
  labels: Array
  affine: Array
  reader_labels: dict[str, Array]
  truth: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Grid:
  """A voxel grid plus the rigid (or mirrored) placement of the model frame in world space.

  shape: (X, Y, Z) voxels. affine: voxel index -> world RAS mm. model_to_world: 4x4, model
  frame mm -> world RAS mm.
  """

  shape: tuple[int, int, int]
  affine: Array
  model_to_world: Array

  @property
  def spacing(self) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes."""
    return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

  @property
  def voxel_ml(self) -> float:
    """Volume of one voxel in mL (= cm^3)."""
    return float(np.prod(self.spacing)) / 1000.0

  @property
  def index_to_model(self) -> Array:
    return np.linalg.inv(self.model_to_world) @ self.affine

  def coords(self, sl: Slices) -> tuple[Array, Array, Array]:
    """Model-frame coordinates (mm, float32 [n, m, l]) of the voxel centres in box `sl`."""
    m = self.index_to_model.astype(np.float32)
    i = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None, None]
    j = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :, None]
    k = np.arange(sl[2].start, sl[2].stop, dtype=np.float32)[None, None, :]
    return tuple(m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3))

  def index_box(self, box: Box, pad_mm: float) -> Slices | None:
    """Smallest voxel box covering the model-frame box `box` grown by pad_mm; None if empty."""
    lo = np.asarray(box[0], np.float64) - pad_mm
    hi = np.asarray(box[1], np.float64) + pad_mm
    corners = np.array(list(itertools.product(*zip(lo, hi))))
    to_index = np.linalg.inv(self.index_to_model)
    idx = corners @ to_index[:3, :3].T + to_index[:3, 3]
    start = np.maximum(np.floor(idx.min(axis=0)).astype(int), 0)
    stop = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, self.shape)
    if np.any(stop <= start):
      return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


@dataclasses.dataclass
class LayerSample:
  """What a layer returns on a voxel box.

  sdf: signed distance of the tissue (mm); voxels whose centre has sdf < 0 belong to it
    (unless a higher layer took them), and it hides lower layers.
  intensity: scalar or array, the tissue's clean signal.
  coverage: optional explicit partial-volume fraction in [0, 1] (thin shells); None means a
    ramp across the visible SDF.
  """

  sdf: Array
  intensity: Array | float
  coverage: Array | None = None


@dataclasses.dataclass
class Layer:
  """A tissue. `sample(scene, sl, (x, y, z))` evaluates it on the voxel box sl."""

  name: str
  label: int
  box: Box
  sample: Callable[[Scene, Slices, tuple[Array, Array, Array]], LayerSample]


class Scene:
  """A grid plus named SDF fields, each evaluated once on its own box and then cached."""

  def __init__(self, grid: Grid, ramp_mm: float):
    self.grid = grid
    self.ramp_mm = float(ramp_mm)
    self.textures: dict[str, Array] = {}
    self._fields: dict[str, tuple[Callable[..., Array], Box]] = {}
    self._cache: dict[str, tuple[Slices | None, Array | None]] = {}

  def add_field(self, name: str, fn: Callable[[Array, Array, Array], Array], box: Box) -> None:
    """Registers the model-frame SDF `fn(x, y, z)`, which is < FAR only inside `box`."""
    self._fields[name] = (fn, box)

  def field(self, name: str, sl: Slices) -> Array:
    """Field `name` on voxel box sl (FAR where the field's own box does not reach)."""
    if name not in self._cache:
      fn, box = self._fields[name]
      own = self.grid.index_box(box, pad_mm=2 * self.ramp_mm)
      self._cache[name] = (own, None if own is None else fn(*self.grid.coords(own)))
    own, values = self._cache[name]
    shape = tuple(s.stop - s.start for s in sl)
    out = np.full(shape, FAR, np.float32)
    if own is None:
      return out
    inter = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, own))
    if any(s.stop <= s.start for s in inter):
      return out
    dst = tuple(slice(i.start - a.start, i.stop - a.start) for i, a in zip(inter, sl))
    src = tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inter, own))
    out[dst] = values[src]
    return out


@dataclasses.dataclass
class Rendered:
  """Output of `render`.

  image: float32 [X, Y, Z] clean (noise-free, unblurred) signal. labels: uint8 [X, Y, Z].
  owner: int16 [X, Y, Z] index of the layer owning each voxel (-1: background).
  voxels: per layer, number of voxels it owns. fraction_sum: per layer, sum of its
  partial-volume fractions (times the voxel volume: its continuous volume).
  """

  image: Array
  labels: Array
  owner: Array
  voxels: list[int]
  fraction_sum: list[float]


def ramp(v: Array, width: float) -> Array:
  """Partial-volume fraction of the half-space v < 0 in a voxel of size `width` (linear ramp)."""
  return np.clip(np.float32(0.5) - v / np.float32(width), 0, 1)


def shell_coverage(d: Array, thickness: Array, width: float) -> Array:
  """Fraction of the window [d - w/2, d + w/2] inside the shell 0 <= d <= thickness.

  The exact box-filter coverage of a flat shell, so a shell thinner than a voxel gets
  a proportionally faint contribution instead of vanishing or doubling.
  """
  half = np.float32(width / 2)
  overlap = np.minimum(d + half, thickness) - np.maximum(d - half, 0)
  return np.clip(overlap / np.float32(width), 0, 1)


def render(scene: Scene, layers: list[Layer], background: float = 0.0) -> Rendered:
  """Evaluates the layers (highest priority first) into a clean image and a label map."""
  grid, h = scene.grid, scene.ramp_mm
  image = np.zeros(grid.shape, np.float32)
  fsum = np.zeros(grid.shape, np.float32)
  union = np.full(grid.shape, FAR, np.float32)  # SDF of everything above the current layer
  owner = np.full(grid.shape, -1, np.int16)
  voxels, fraction_sum = [], []
  for index, layer in enumerate(layers):
    sl = grid.index_box(layer.box, pad_mm=h)
    if sl is None:
      voxels.append(0)
      fraction_sum.append(0.0)
      continue
    s = layer.sample(scene, sl, grid.coords(sl))
    above = union[sl]
    if s.coverage is None:
      frac = ramp(np.maximum(s.sdf, -above), h)
    else:
      frac = s.coverage * (1 - ramp(above, h))
    image[sl] += frac * s.intensity
    fsum[sl] += frac
    own = owner[sl]
    claim = (s.sdf < 0) & (own < 0)
    own[claim] = index
    np.minimum(above, s.sdf, out=above)
    voxels.append(int(claim.sum()))
    fraction_sum.append(float(frac.sum(dtype=np.float64)))
  over = fsum > 1
  image[over] /= fsum[over]
  image += np.clip(1 - fsum, 0, 1) * np.float32(background)
  label_of = np.array([layer.label for layer in layers] + [0], np.uint8)
  labels = label_of[owner]  # owner -1 picks the trailing 0
  return Rendered(image, labels, owner, voxels, fraction_sum)
