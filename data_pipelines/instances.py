"""2D label slices -> instances (class, box, mask), padded to static shapes for the model.

Boxes are (y1, x1, y2, x2) in continuous pixel coordinates: pixel (r, c) covers
[r, r + 1) x [c, c + 1), so a tight box is y1 = first row, y2 = last row + 1 (likewise x).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

MODES = ('per_class', 'components')


@dataclasses.dataclass(frozen=True, eq=False)
class Instances:
  """N instances of one slice. classes: int32 [N] (>= 1); boxes: float32 [N, 4] (y1, x1, y2, x2);
  masks: bool [N, H, W]. Ordered by class id, then (components mode) by the raster position of
  each component's first pixel."""

  classes: np.ndarray
  boxes: np.ndarray
  masks: np.ndarray

  def __len__(self) -> int:
    return int(self.classes.shape[0])

  @property
  def areas(self) -> np.ndarray:
    """Pixel count of each mask, int64 [N]."""
    return self.masks.reshape(len(self), -1).sum(axis=1)


def mask_box(mask: np.ndarray) -> np.ndarray:
  """Tight box (y1, x1, y2, x2) float32 of a non-empty boolean mask [H, W]."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    raise ValueError('mask_box needs a non-empty mask')
  return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], dtype=np.float32)


def extract_instances(
  label_slice: np.ndarray,
  class_map: Mapping[int, int],
  *,
  mode: str = 'per_class',
  connectivity: int = 8,
  min_pixels: int = 1,
) -> Instances:
  """Instances of one label slice [H, W].

  class_map: label value -> class id (>= 1), e.g. knee {1: 1, 2: 2, 3: 3, 4: 4}, hip effusion
    {1: 1}. Values not in the map are background. Several values may share a class id: their
    pixels then form one class.
  mode: 'per_class' gives one instance per class present (all its pixels); 'components' one per
    connected component of each class (scipy.ndimage.label).
  connectivity: 8 (diagonal neighbours connect) or 4; used in 'components' mode.
  min_pixels: instances with fewer pixels are dropped (in both modes).
  """
  label_slice = np.asarray(label_slice)
  if label_slice.ndim != 2:
    raise ValueError(f'expected a label slice [H, W], got shape {label_slice.shape}')
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if connectivity not in (4, 8):
    raise ValueError(f'connectivity must be 4 or 8, got {connectivity}')
  if any(int(c) < 1 for c in class_map.values()):
    raise ValueError(f'class ids must be >= 1 (0 is padding), got {dict(class_map)}')
  structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
  classes, boxes, masks = [], [], []
  for class_id in sorted({int(c) for c in class_map.values()}):
    values = [v for v, c in class_map.items() if int(c) == class_id]
    class_mask = np.isin(label_slice, values)
    if mode == 'per_class':
      pieces = [class_mask] if class_mask.any() else []
    else:
      components, count = ndimage.label(class_mask, structure=structure)
      pieces = [components == k for k in range(1, count + 1)]
    for piece in pieces:
      if piece.sum() >= min_pixels:
        classes.append(class_id)
        boxes.append(mask_box(piece))
        masks.append(piece)
  height, width = label_slice.shape
  return Instances(
    classes=np.array(classes, dtype=np.int32),
    boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
    masks=np.array(masks, dtype=bool).reshape(-1, height, width),
  )


def select_slices(
  has_instances: np.ndarray, empty_keep_rate: float, seed: int, key: str = ''
) -> np.ndarray:
  """Which slices of one volume to keep, bool [n]: every slice with instances, plus
  round(empty_keep_rate * number of empty slices) empty ones drawn without replacement.

  Deterministic in (seed, key, has_instances): pass the case id as `key` so each case gets its
  own draw, independent of the order cases are processed in.
  """
  has_instances = np.asarray(has_instances, dtype=bool)
  if not 0.0 <= empty_keep_rate <= 1.0:
    raise ValueError(f'empty_keep_rate must be in [0, 1], got {empty_keep_rate}')
  empty = np.flatnonzero(~has_instances)
  num_keep = int(round(empty_keep_rate * empty.size))
  rng = np.random.default_rng([int(seed), zlib.crc32(key.encode('utf-8'))])
  keep = has_instances.copy()
  keep[rng.choice(empty, size=num_keep, replace=False)] = True
  return keep
