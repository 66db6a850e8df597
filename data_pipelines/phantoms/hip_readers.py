"""Simulated readers of hip effusion, working the way the paper's readers did.

On each slice they draw a region around the effusion they see, then keep what is brighter
than an Otsu threshold inside their regions. Each has a habit of their own (`READER_HABITS`):
reader1 draws tight, thresholds at Otsu and leaves bone out; reader2 draws generously,
thresholds lower and takes in bright marrow (oedema) and thickened synovium where they touch
the fluid. Sometimes one misses a small pocket. Their disagreement thus comes from the same
places as real readers': the partial volume at the fluid's edge, oedema, synovium, vessels
inside a generous region. Ranges: docs/phantoms.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

Array = np.ndarray

READERS = ('reader1', 'reader2')
# How each simulated reader works (ranges are drawn per scan): the margin of the region they
# draw around the effusion they see (mm, in-plane), their threshold as a multiple of the Otsu
# threshold of the image inside their regions, and whether they leave bone (marrow) out.
READER_HABITS = {
  'reader1': dict(margin_mm=(2.0, 4.0), otsu_factor=(0.95, 1.05), excludes_bone=True),
  'reader2': dict(margin_mm=(3.0, 6.0), otsu_factor=(0.8, 0.95), excludes_bone=False),
}


def otsu_threshold(values: Array, bins: int = 256) -> float:
  """Otsu's threshold of a sample: the histogram bin edge that maximises the between-class
  variance (values above it are the bright class)."""
  values = np.asarray(values, np.float64).ravel()
  counts, edges = np.histogram(values, bins=bins)
  centres = (edges[:-1] + edges[1:]) / 2
  w0 = np.cumsum(counts)[:-1].astype(np.float64)  # class below each inner edge
  w1 = values.size - w0
  s0 = np.cumsum(counts * centres)[:-1]
  m0 = s0 / np.maximum(w0, 1)
  m1 = (float((counts * centres).sum()) - s0) / np.maximum(w1, 1)
  between = w0 * w1 * (m0 - m1) ** 2
  # Between empty bins the variance is flat: take the middle of the best run of edges, not
  # its low end (a crisp two-level image would otherwise threshold at its dark level).
  best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
  return float((edges[1 + best[0]] + edges[1 + best[-1]]) / 2)


def reader_labels(
  image: Array,
  truth_labels: Array,
  owner: Array,
  pocket_layers: dict[int, str],
  bone: Array,
  spacing: tuple[float, float, float],
  rng: np.random.Generator,
) -> tuple[dict[str, Array], dict[str, Any]]:
  """The simulated readers' effusion maps, made the way the paper's readers made theirs.

  image: the acquired image [X, Y, Z] (slices along axis 2); truth_labels: 1 = effusion;
  owner: the rendered layer index per voxel (pocket_layers: layer index -> pocket name);
  bone: voxels of bone (marrow, cortex). Each reader, with a habit from READER_HABITS drawn
  afresh per scan: on every slice where they see effusion, draws a region around it (the
  in-plane distance to the fluid they see below their margin, the outline wandering by about
  a millimetre), takes Otsu's threshold of the image inside all their regions times their
  factor, and labels what is brighter inside the regions (without bone for a reader who
  leaves it out), holes filled per slice. With probability 0.35 one reader does not see the
  smallest pocket if it holds under 2 mL.

  Returns per reader a uint8 map (1 = effusion) and their habit as drawn (margin_mm,
  otsu_factor, threshold, excludes_bone, missed_pocket).
  """
  fluid = truth_labels == 1
  sp = np.asarray(spacing, np.float64)
  sizes = {i: int((owner == i).sum()) for i in pocket_layers}
  present = {i: v for i, v in sizes.items() if v > 0}
  voxel_ml = float(np.prod(sp)) / 1000.0
  missed_by = None
  if present and rng.random() < 0.35:
    small = min(present, key=present.get)
    if present[small] * voxel_ml < 2.0:
      missed_by = (READERS[int(rng.integers(2))], small)
  out, info = {}, {}
  for r in READERS:
    habit = READER_HABITS[r]
    margin = float(rng.uniform(*habit['margin_mm']))
    factor = float(rng.uniform(*habit['otsu_factor']))
    wander = rng.standard_normal(fluid.shape).astype(np.float32)
    wander = ndimage.gaussian_filter(wander, (5.0 / sp[0], 5.0 / sp[1], 0.0), mode='nearest')
    wander /= max(float(wander.std()), 1e-9)
    seen = fluid.copy()
    missed = None
    if missed_by is not None and missed_by[0] == r:
      # The nearest pocket of each fluid voxel is its owner (pockets own their voxels).
      seen &= owner != missed_by[1]
      missed = pocket_layers[missed_by[1]]
    region = np.zeros_like(fluid)
    for z in range(fluid.shape[2]):
      if seen[..., z].any():
        dist = ndimage.distance_transform_edt(~seen[..., z], sampling=sp[:2])
        region[..., z] = dist < margin + 1.0 * wander[..., z]
    mask = np.zeros_like(fluid)
    threshold = float('nan')
    if region.any():
      threshold = factor * otsu_threshold(image[region])
      mask = region & (image > threshold)
      if habit['excludes_bone']:
        mask &= ~bone
      for z in range(mask.shape[2]):
        mask[..., z] = ndimage.binary_fill_holes(mask[..., z]) & region[..., z]
    out[r] = mask.astype(np.uint8)
    info[r] = {
      'margin_mm': round(margin, 3),
      'otsu_factor': round(factor, 4),
      'threshold': None if np.isnan(threshold) else round(threshold, 2),
      'excludes_bone': bool(habit['excludes_bone']),
      'missed_pocket': missed,
    }
  return out, info
