"""Rules applied to a predicted volume after its slices are painted.

The network sees one slice at a time, so nothing stops it from painting a bone-like blob
into a slice far from the joint (the outermost slices of a wide field of view, where it never
saw air in training). A tissue that is one object in every knee (a femur, a tibia) is kept
as its largest 3D connected component, as nnU-Net's post-processing does for classes where
its validation shows that this helps. Tissues that may come in several pieces (the medial
and lateral tibial plates, effusion in both hips) are left alone. Measured: docs/evaluation.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from data_pipelines.tissues import LabelScheme

# 26-connected in 3D: voxels touching at a corner are one object, so a thin bridge between
# two parts of one bone never splits it.
_FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)


def class_ids(scheme: LabelScheme, names: Sequence[str], field: str) -> tuple[int, ...]:
  """Class ids (1..K) of tissue `names` in `scheme`; `field` names the config setting for the
  error when a name is not one of the scheme's classes."""
  unknown = [n for n in names if n not in scheme.class_names]
  if unknown:
    raise ValueError(
      f'config {field}={tuple(names)}: {unknown} not among the classes {scheme.class_names}'
    )
  return tuple(scheme.class_names.index(n) + 1 for n in names)


def keep_largest_component(class_volume: np.ndarray, ids: Sequence[int]) -> np.ndarray:
  """Sets to background (0) every voxel of each class in `ids` outside that class's largest
  26-connected component.

  class_volume: int [n, h, w] class ids (a stack of slices, or any 3D grid: connectivity does
    not depend on the axis order or spacing, and the component with most voxels is the one
    with the largest volume since all voxels of a grid have one size).
  Returns a new array; ties between equal components keep the first in scan order.
  """
  class_volume = np.asarray(class_volume)
  if class_volume.ndim != 3:
    raise ValueError(f'class volume of shape {class_volume.shape}; expected 3 axes')
  out = class_volume.copy()
  for class_id in ids:
    mask = class_volume == class_id
    components, count = ndi.label(mask, structure=_FULL_CONNECTIVITY)
    if count <= 1:
      continue
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    out[mask & (components != int(np.argmax(sizes)))] = 0
  return out
