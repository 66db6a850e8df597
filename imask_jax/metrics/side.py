"""Left or right knee, estimated from a canonical label map: the tibial cartilage plates.

A NIfTI file does not record which knee it holds, so which side is medial is unknown
(data_pipelines/laterality.py reads what a scan declares); this estimates it from the anatomy,
for scans that declare nothing and to check those that do. The cue: the medial tibial plateau
is longer front to back and larger than the lateral one. `estimate_side(label_map, spacing)`
splits the tibial cartilage into two plates along canonical axis 0 (RAS+: larger index =
further right) and calls medial the plate that is longer and larger by at least MIN_LOG_RATIO
in log ratio on each cue; medial at smaller R is a right knee. Its `SideEstimate` has the side
(None, with the reason, when it cannot tell) and `margin`, the smaller of the two log ratios.

The rule step by step, when it gives no side, its accuracy and the cues not used:
docs/evaluation.md, 'Side'.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_pipelines.tissues import KneeLabelValues

MIN_LOG_RATIO = 0.04
MIN_PLATE_FRACTION = 0.15
MIN_CARTILAGE_MM3 = 500.0
VALLEY_MM = 3.0  # the gap between the plates is looked for this close to the cut
VALLEY_FRACTION = 0.25  # a gap holds at most this fraction of the smaller plate's peak
EDGE_FRACTION = 0.01  # a plate with more of its voxels than this on the array's edge is cut
SIDES = ('left', 'right')


@dataclasses.dataclass(frozen=True)
class SideEstimate:
  """side: 'left', 'right' or None; margin: the smaller of the two cues' log ratios (medial
  over lateral) when a side is given, else None; basis: one line saying what was measured and
  why this side (or why none). length_mm and area_mm2: (the plate at smaller R, the plate at
  larger R), None where the plates could not be measured."""

  side: str | None
  margin: float | None
  basis: str
  length_mm: tuple[float, float] | None = None
  area_mm2: tuple[float, float] | None = None


def _otsu(positions: np.ndarray, bin_mm: float) -> float:
  """Otsu's threshold of 1D positions (mm), on a histogram of `bin_mm` bins."""
  low, high = float(positions.min()), float(positions.max())
  bins = max(2, int(math.ceil((high - low) / bin_mm)) + 1)
  counts, edges = np.histogram(positions, bins=bins, range=(low, low + bins * bin_mm))
  centres = 0.5 * (edges[:-1] + edges[1:])
  w0 = np.cumsum(counts)[:-1].astype(np.float64)
  s0 = np.cumsum(counts * centres)[:-1]
  total, total_sum = float(counts.sum()), float((counts * centres).sum())
  w1 = total - w0
  valid = (w0 > 0) & (w1 > 0)
  between = np.zeros_like(w0)
  m0 = np.divide(s0, w0, out=np.zeros_like(w0), where=valid)
  m1 = np.divide(total_sum - s0, w1, out=np.zeros_like(w0), where=valid)
  between[valid] = w0[valid] * w1[valid] * (m0[valid] - m1[valid]) ** 2
  return float(edges[1:-1][int(np.argmax(between))])


def _valley(positions: np.ndarray, threshold: float, bin_mm: float) -> tuple[int, int]:
  """(the fewest voxels in a `bin_mm` bin within VALLEY_MM of `threshold`, the smaller of the
  two sides' most voxels in a bin)."""
  low = float(positions.min())
  bins = max(2, int(math.ceil((float(positions.max()) - low) / bin_mm)) + 1)
  counts, edges = np.histogram(positions, bins=bins, range=(low, low + bins * bin_mm))
  centres = 0.5 * (edges[:-1] + edges[1:])
  near = np.abs(centres - threshold) <= max(VALLEY_MM, bin_mm)
  peak = min(int(counts[centres < threshold].max()), int(counts[centres >= threshold].max()))
  return int(counts[near].min()), peak


def _none(reason: str, **measured) -> SideEstimate:
  return SideEstimate(None, None, reason, **measured)


def estimate_side(
  label_map: np.ndarray,
  spacing: Sequence[float],
  knee: KneeLabelValues | None = None,
) -> SideEstimate:
  """The side of the knee in a canonical (RAS+) label map with voxel `spacing` (mm along its
  axes), from its tibial cartilage (`knee.tibial_cartilage`); the rule: docs/evaluation.md,
  'Side'."""
  knee = knee or KneeLabelValues()
  spacing = np.asarray(spacing, np.float64)
  voxels = np.argwhere(np.asarray(label_map) == knee.tibial_cartilage)
  volume = len(voxels) * float(np.prod(spacing))
  if volume < MIN_CARTILAGE_MM3:
    return _none(
      f'too little tibial cartilage (label {knee.tibial_cartilage}) to tell the plates apart: '
      f'{volume:.0f} mm^3, under {MIN_CARTILAGE_MM3:.0f}'
    )
  xy = voxels[:, :2] * spacing[:2]
  bin_mm = float(max(spacing[:2]))
  a_side = xy[:, 0] < _otsu(xy[:, 0], float(spacing[0]))
  # Refine along the line through the two plates' centroids (a knee rotated in the axial plane).
  axis = xy[~a_side].mean(axis=0) - xy[a_side].mean(axis=0)
  if not np.any(axis):
    return _none('the tibial cartilage is not two plates side by side')
  axis /= np.linalg.norm(axis)
  along = xy @ axis
  threshold = _otsu(along, bin_mm)
  a_side = along < threshold
  fractions = (a_side.mean(), 1 - a_side.mean())
  if min(fractions) < MIN_PLATE_FRACTION:
    return _none(
      'the tibial cartilage is not two plates side by side (the smaller part holds '
      f'{100 * min(fractions):.0f} % of it, under {100 * MIN_PLATE_FRACTION:.0f} %)'
    )
  valley, peak = _valley(along, threshold, bin_mm)
  if valley > VALLEY_FRACTION * peak:
    return _none(
      'the tibial cartilage is not two plates side by side (no gap between its halves: '
      f"{valley} voxels per {bin_mm:g} mm at the cut, {peak} at the smaller half's peak)"
    )
  front = np.array([-axis[1], axis[0]])
  shape = np.asarray(label_map.shape)
  lengths, areas = [], []
  for name, plate in (('smaller-R', a_side), ('larger-R', ~a_side)):
    ij = voxels[plate, :2]
    on_edge = np.any((ij == 0) | (ij == shape[:2] - 1), axis=1).mean()
    if on_edge > EDGE_FRACTION:
      return _none(
        f'the {name} tibial plate reaches the edge of the field of view '
        f'({100 * on_edge:.0f} % of its voxels), so it may be cut'
      )
    ap = xy[plate] @ front
    lengths.append(float(np.percentile(ap, 98) - np.percentile(ap, 2)))
    footprint = np.zeros(shape[:2], bool)
    footprint[ij[:, 0], ij[:, 1]] = True
    # Holes (a denuded area inside the plate) count: the plateau's size is what differs.
    areas.append(int(ndimage.binary_fill_holes(footprint).sum()) * float(spacing[0] * spacing[1]))
  length_mm, area_mm2 = (lengths[0], lengths[1]), (areas[0], areas[1])
  log_length = math.log(lengths[0] / lengths[1]) if min(lengths) > 0 else 0.0
  log_area = math.log(areas[0] / areas[1])
  measured = (
    f'AP length {lengths[0]:.1f} / {lengths[1]:.1f} mm, area {areas[0]:.0f} / {areas[1]:.0f} '
    'mm^2 (the tibial plate at smaller R / at larger R)'
  )
  if log_length * log_area <= 0 or min(abs(log_length), abs(log_area)) < MIN_LOG_RATIO:
    return _none(
      f'{measured}: not one plate both longer and larger by {MIN_LOG_RATIO:g} in log ratio',
      length_mm=length_mm,
      area_mm2=area_mm2,
    )
  medial_at_smaller_r = log_length > 0
  side = 'right' if medial_at_smaller_r else 'left'
  where = 'smaller R (patient left)' if medial_at_smaller_r else 'larger R (patient right)'
  return SideEstimate(
    side,
    min(abs(log_length), abs(log_area)),
    f'{measured}: the longer and larger plate, medial, lies at {where}: a {side} knee',
    length_mm,
    area_mm2,
  )
