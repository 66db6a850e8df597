"""Femorotibial cartilage subregions and their measures, on the flattened thickness maps.

The regions are those of the nomenclature of Eckstein et al. (Osteoarthritis Cartilage 2006)
and the regional technique of Wirth & Eckstein (IEEE Trans Med Imaging 2008), which large OA
studies and trials report: the medial and lateral tibia (MT, LT), each cut into a central,
external, internal, anterior and posterior subregion (cMT, eMT, iMT, aMT, pMT, ...); the
weight-bearing medial and lateral femoral condyles (cMF, cLF), each cut into an external,
central and internal third (ecMF, ccMF, icMF, ...); and the totals MFTC = MT + cMF,
LFTC = LT + cLF, FTJ = MFTC + LFTC. The trochlea (TrF, anterior to the intercondylar notch)
and the posterior condyles (pMF, pLF) are reported apart. docs/metrics.md says how each
definition was turned into a rule on voxel data; in short:

* Every measure is taken on a plate's thickness map (metrics.thickness): the tibia's axial
  projection (cells of bin x bin mm of plateau) and the femur's map unrolled around the
  condylar cylinder (cells of angle x radius by axial bin mm of bone surface). A cell holds
  the mean thickness of the bone-cartilage interface points that project into it.
* tAB, the total area of subchondral bone of a (sub)region, is its footprint: its plate's
  cartilage-covered cells with the holes they enclose (a denuded hole inside a plate counts,
  the bone around the plate does not); cAB the covered cells; dAB % = 100 (tAB - cAB) / tAB.
* ThCcAB: the mean thickness over the covered cells; ThCtAB: over the whole footprint, denuded
  cells counting 0 (= ThCcAB cAB / tAB); VC: the cartilage volume, sum of thickness x cell area.
* Medial and lateral follow from the knee's side: in canonical RAS+ arrays the lateral side of
  a right knee is at larger R, that of a left knee at smaller R. Internal is towards the
  intercondylar region, external away from it.

Inputs are `ThicknessMap`s of one knee; outputs plain numbers per region name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from imask_jax.metrics.thickness_maps import ThicknessMap

SIDES = ('left', 'right')
# Wirth & Eckstein 2008: the central tibial subregion is an ellipse of 20 % of the plate's tAB
# around its centre of gravity; the weight-bearing femoral region spans 60 % of the distance
# from the anterior end of the intercondylar notch to the posterior end of the condyles.
CENTRAL_TIBIAL_FRACTION = 0.20
WEIGHT_BEARING_FRACTION = 0.60
# Rows are apart at the femoral notch when no cartilage lies within half of this (mm) of the
# column between the condyles.
MIN_GAP_MM = 2.0

TIBIAL_PARTS = ('c', 'e', 'i', 'a', 'p')  # central, external, internal, anterior, posterior
FEMORAL_PARTS = ('e', 'c', 'i')  # external, central, internal third of the condyle


@dataclasses.dataclass(frozen=True)
class RegionMeasures:
  """One (sub)region's measures: ThCcAB / ThCtAB (mm), VC (mm^3), cAB / tAB (mm^2), dAB (%);
  cells: covered cells of the map. Thicknesses are NaN for a region without cartilage."""

  thickness_cab_mm: float
  thickness_tab_mm: float
  volume_mm3: float
  cab_mm2: float
  tab_mm2: float
  denuded_percent: float
  cells: int

  def as_dict(self) -> dict[str, float | int]:
    return dataclasses.asdict(self)


MEASURES = tuple(f.name for f in dataclasses.fields(RegionMeasures))


def check_side(side: str, where: str) -> str:
  if side not in SIDES:
    raise ValueError(f'{where}: side={side!r}; expected one of {SIDES}')
  return side


# ----------------------------------------------------------------------------- footprints


def footprint(covered: np.ndarray) -> np.ndarray:
  """bool [R, C]: the covered cells with the holes they enclose filled (after closing one-cell
  gaps), the plate's area of subchondral bone: a denuded hole inside the plate counts, a
  concave outline (the notch side of a condyle) does not."""
  closed = ndimage.binary_closing(covered, structure=np.ones((3, 3), bool)) | covered
  return ndimage.binary_fill_holes(closed)


def _split_column(covered: np.ndarray, centers: np.ndarray, where: str) -> float:
  """The column coordinate (mm) between two plates: the middle of the longest run of the least
  covered columns in the middle half of the covered range (a run without cartilage where the
  plates are apart; where some rows cross, such as the trochlea above the femoral notch, the
  columns they alone cover)."""
  counts = covered.sum(axis=0)
  filled = np.flatnonzero(counts)
  if filled.size < 2:
    raise ValueError(f'{where}: too little cartilage to find the two plates')
  low, high = centers[filled[0]], centers[filled[-1]]
  middle = np.flatnonzero(
    (centers >= low + 0.25 * (high - low)) & (centers <= high - 0.25 * (high - low))
  )
  if middle.size == 0:
    raise ValueError(f'{where}: too little cartilage to find the two plates')
  least = counts[middle].min()
  best: list[int] = []
  run: list[int] = []
  for j in middle:
    if counts[j] == least:
      run.append(int(j))
      if len(run) > len(best):
        best = list(run)
    else:
      run = []
  return float(centers[best].mean())


def _lateral_is_larger_r(side: str) -> bool:
  return side == 'right'


# ----------------------------------------------------------------------------- the tibia


def tibial_regions(tibial: ThicknessMap, side: str) -> dict[str, np.ndarray]:
  """Cell masks [rows, cols] of the tibial map: 'MT', 'LT' (each plate's footprint) and the
  subregions 'cMT', 'eMT', 'iMT', 'aMT', 'pMT', 'cLT', ... (module docstring)."""
  where = 'tibial_regions'
  check_side(side, where)
  covered = np.isfinite(tibial.thickness_mm)
  anterior, right = tibial.row_centers, tibial.col_centers
  split = _split_column(covered, right, where)
  larger_r = right[None, :] > split
  lateral_larger = _lateral_is_larger_r(side)
  out: dict[str, np.ndarray] = {}
  for plate, on_larger_r in (('MT', not lateral_larger), ('LT', lateral_larger)):
    half = larger_r if on_larger_r else ~larger_r
    mask = footprint(covered & half) & half
    out[plate] = mask
    out.update(
      _tibial_subregions(mask, anterior, right, plate, internal_is_larger_r=not on_larger_r)
    )
  return out


def _tibial_subregions(
  plate: np.ndarray,
  anterior: np.ndarray,
  right: np.ndarray,
  name: str,
  internal_is_larger_r: bool,
) -> dict[str, np.ndarray]:
  """The central ellipse (20 % of the plate's cells, centred on their centre of gravity, axes
  in the ratio of the plate's spread along A and R) and the four sectors around it, cut by the
  lines at +-45 degrees through the centre."""
  ys, xs = np.meshgrid(anterior, right, indexing='ij')
  if not plate.any():
    return {f'{p}{name}': np.zeros_like(plate) for p in TIBIAL_PARTS}
  cy, cx = ys[plate].mean(), xs[plate].mean()
  sy, sx = max(ys[plate].std(), 1e-6), max(xs[plate].std(), 1e-6)
  # The ellipse ((y - cy) / (k sy))^2 + ((x - cx) / (k sx))^2 <= 1 has area pi k^2 sy sx: k
  # such that it holds CENTRAL_TIBIAL_FRACTION of the plate's area (cells of equal area).
  cell_area = (
    abs((anterior[1] - anterior[0]) * (right[1] - right[0]))
    if anterior.size > 1 and right.size > 1
    else 1.0
  )
  k = math.sqrt(CENTRAL_TIBIAL_FRACTION * plate.sum() * cell_area / (math.pi * sy * sx))
  u, v = (ys - cy) / sy, (xs - cx) / sx  # plate-normalised, so the sector lines are diagonals
  central = plate & (u**2 + v**2 <= k**2)
  rest = plate & ~central
  along_r = np.abs(v) >= np.abs(u)
  toward_larger_r = v > 0
  internal = rest & along_r & (toward_larger_r == internal_is_larger_r)
  external = rest & along_r & (toward_larger_r != internal_is_larger_r)
  return {
    f'c{name}': central,
    f'e{name}': external,
    f'i{name}': internal,
    f'a{name}': rest & ~along_r & (u > 0),
    f'p{name}': rest & ~along_r & (u <= 0),
  }


# ----------------------------------------------------------------------------- the femur


def femoral_regions(femoral: ThicknessMap, side: str) -> dict[str, np.ndarray]:
  """Cell masks [rows, cols] of the femoral map: 'TrF' (anterior to the notch), 'cMF', 'cLF'
  (the weight-bearing condyles), 'pMF', 'pLF' (posterior to them) and the thirds 'ecMF',
  'ccMF', 'icMF', 'ecLF', ... (module docstring).

  Rows are angles about the condylar axis (0 distal, +90 anterior); the notch is found as the
  cartilage-free run of columns between the condyles (`_split_column`, over the rows posterior
  to the most anterior angle where the two condyles are still apart)."""
  where = 'femoral_regions'
  check_side(side, where)
  covered = np.isfinite(femoral.thickness_mm)
  angle, axial = femoral.row_centers, femoral.col_centers
  # The notch: rows between -120 and +60 degrees (distal and posterior) show it.
  band = (angle > -120) & (angle < 60)
  split = _split_column(covered & band[:, None], axial, where)
  larger = axial[None, :] > split
  # Its anterior end: the most anterior row at which no cartilage crosses the split column
  # (within MIN_GAP_MM / 2 of it) while both condyles have cartilage.
  near = np.abs(axial - split) <= MIN_GAP_MM / 2
  apart = covered.any(axis=1) & ~covered[:, near].any(axis=1)
  both = (covered & larger).any(axis=1) & (covered & ~larger).any(axis=1)
  notch_rows = np.flatnonzero(apart & both & (angle < 90))
  if notch_rows.size == 0:
    raise ValueError(f'{where}: no intercondylar notch found on the femoral map')
  anterior_end = float(angle[notch_rows].max())
  lateral_larger = _lateral_is_larger_r(side)
  out = {
    'TrF': footprint(covered & (angle[:, None] > anterior_end)) & (angle[:, None] > anterior_end)
  }
  for condyle, on_larger in (('MF', not lateral_larger), ('LF', lateral_larger)):
    half = larger if on_larger else ~larger
    rows_with = np.flatnonzero((covered & half).any(axis=1) & (angle <= anterior_end))
    posterior_end = float(angle[rows_with].min()) if rows_with.size else anterior_end
    cut = anterior_end - WEIGHT_BEARING_FRACTION * (anterior_end - posterior_end)
    weight_bearing = half & (angle[:, None] <= anterior_end) & (angle[:, None] >= cut)
    posterior = half & (angle[:, None] < cut)
    central = footprint(covered & weight_bearing) & weight_bearing
    out[f'c{condyle}'] = central
    out[f'p{condyle}'] = footprint(covered & posterior) & posterior
    # Thirds of the condyle's mediolateral width, internal by the notch: the columns that
    # hold a quarter of the best-covered column's cells or more (not the few cells where the
    # condyle joins the trochlea across the notch).
    counts = (covered & weight_bearing).sum(axis=0)
    cols = np.flatnonzero(counts >= max(1, 0.25 * counts.max()))
    if cols.size:
      low, high = axial[cols[0]], axial[cols[-1]]
      third = (high - low) / 3
      position = (axial - low) if on_larger else (high - axial)  # 0 at the notch side
      for part, lo, hi in (
        ('i', -np.inf, third),
        ('c', third, 2 * third),
        ('e', 2 * third, np.inf),
      ):
        out[f'{part}c{condyle}'] = central & ((position >= lo) & (position < hi))[None, :]
    else:
      for part in FEMORAL_PARTS:
        out[f'{part}c{condyle}'] = np.zeros_like(central)
  return out


# ----------------------------------------------------------------------------- measures


def cell_area_mm2(m: ThicknessMap) -> float:
  """The area of one map cell: bin x bin of plateau (tibia), angle x radius by axial bin of
  the condylar cylinder's surface (femur)."""
  row_step = float(m.row_edges[1] - m.row_edges[0])
  col_step = float(m.col_edges[1] - m.col_edges[0])
  if m.cylinder is not None:
    row_step = math.radians(row_step) * m.cylinder.radius_mm
  return row_step * col_step


def region_measures(m: ThicknessMap, mask: np.ndarray) -> RegionMeasures:
  """The measures of the cells `mask` [rows, cols] of map `m` (its footprint = tAB)."""
  area = cell_area_mm2(m)
  values = m.thickness_mm[mask]
  covered = values[np.isfinite(values)]
  tab = float(mask.sum()) * area
  cab = float(covered.size) * area
  volume = float(covered.sum()) * area
  return RegionMeasures(
    thickness_cab_mm=float(covered.mean()) if covered.size else math.nan,
    thickness_tab_mm=volume / tab if tab else math.nan,
    volume_mm3=volume,
    cab_mm2=cab,
    tab_mm2=tab,
    denuded_percent=100.0 * (tab - cab) / tab if tab else math.nan,
    cells=int(covered.size),
  )


def knee_subregions(
  femoral: ThicknessMap | None, tibial: ThicknessMap | None, side: str
) -> dict[str, RegionMeasures]:
  """Every region's measures for one knee: the tibial and femoral subregions, the plates
  (MT, LT, cMF, cLF, TrF, pMF, pLF) and the totals MFTC, LFTC and FTJ (module docstring). A
  plate whose map is missing (None) is left out, and the totals that need it."""
  out: dict[str, RegionMeasures] = {}
  masks: dict[str, tuple[ThicknessMap, np.ndarray]] = {}
  if tibial is not None:
    masks.update({k: (tibial, v) for k, v in tibial_regions(tibial, side).items()})
  if femoral is not None:
    masks.update({k: (femoral, v) for k, v in femoral_regions(femoral, side).items()})
  for name, (m, mask) in masks.items():
    out[name] = region_measures(m, mask)
  totals = {'MFTC': ('MT', 'cMF'), 'LFTC': ('LT', 'cLF')}
  for name, parts in totals.items():
    if all(p in out for p in parts):
      out[name] = combine([out[p] for p in parts])
  if 'MFTC' in out and 'LFTC' in out:
    out['FTJ'] = combine([out['MFTC'], out['LFTC']])
  return out


def combine(parts: list[RegionMeasures]) -> RegionMeasures:
  """The measures of the union of disjoint regions (areas and volumes add; thicknesses are
  area-weighted)."""
  tab = sum(p.tab_mm2 for p in parts)
  cab = sum(p.cab_mm2 for p in parts)
  volume = sum(p.volume_mm3 for p in parts)
  return RegionMeasures(
    thickness_cab_mm=volume / cab if cab else math.nan,
    thickness_tab_mm=volume / tab if tab else math.nan,
    volume_mm3=volume,
    cab_mm2=cab,
    tab_mm2=tab,
    denuded_percent=100.0 * (tab - cab) / tab if tab else math.nan,
    cells=sum(p.cells for p in parts),
  )


def as_row(regions: Mapping[str, RegionMeasures]) -> dict[str, float | int]:
  """One flat row, '<region>_<measure>' -> value, for a CSV a statistician can load."""
  return {f'{name}_{k}': v for name, r in regions.items() for k, v in r.as_dict().items()}
