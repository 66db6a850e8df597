"""The knee phantom's femorotibial subregions in the model frame: their analytic cartilage
thickness, and the zones a follow-up visit thins (docs/phantoms.md, "Follow-ups").

The regions are assigned by the very rules metrics.subregions applies to label-map thickness
maps (imported from imask_jax.metrics.subregions), here applied to the analytic thickness fields
sampled on fine parameter grids of the bone surface:

* femur: rows theta (FEMUR_STEP_DEG, 0 distal, positive anterior, about the model's condylar
  axis), columns model x (FEMUR_STEP_MM x scale, positive lateral); the surface point of a node
  is where the ray from the axis at angle theta leaves the femur (KneeModel.femoral_grid);
* tibia: rows model y (anterior), columns model x (lateral), TIBIA_STEP_MM x scale apart; the
  surface point is the first hit of a vertical ray coming down onto the tibia.

A node is covered where the analytic thickness is > 0. Model x grows laterally whatever the
knee's side, so the rules run with side='right' (lateral at larger column) and the names they
give are the anatomical ones for a left knee too. A region's measures are those of
metrics.subregions.RegionMeasures, but weighted by the true bone-surface area of each node
(|dP/du x dP/dv| from the surface points), not by equal map cells.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from data_pipelines.phantoms import sdf

Array = np.ndarray
FEMUR_STEP_DEG = 1.0
FEMUR_STEP_MM = 0.5  # x scale
TIBIA_STEP_MM = 0.5  # x scale
# The thinning zone of a region: its nodes grown by these margins at full weight, the weight
# then falling smoothly to 0 over one more margin (in each direction). Femur: (degrees of
# theta, mm of x); tibia: mm of x and y.
FEMUR_MARGIN = (12.0, 2.0)
TIBIA_MARGIN = 2.0
# Thinning never takes more than this share of the local thickness, so no cartilage vanishes
# (the thin rim of a plate, where the thickness is under twice the amount, loses half).
MAX_THINNING_SHARE = 0.5
MAX_THINNING_MM = 1.0

TIBIAL_REGIONS = tuple(
  f'{p}{plate}' for plate in ('MT', 'LT') for p in ('', 'c', 'e', 'i', 'a', 'p')
)
FEMORAL_REGIONS = (
  'cMF',
  'ecMF',
  'ccMF',
  'icMF',
  'cLF',
  'ecLF',
  'ccLF',
  'icLF',
  'pMF',
  'pLF',
  'TrF',
)
TOTALS = {'MFTC': ('MT', 'cMF'), 'LFTC': ('LT', 'cLF'), 'FTJ': ('MT', 'cMF', 'LT', 'cLF')}
# Every name a follow-up can thin: each maps to the subregions it is made of.
THINNABLE = {
  **{name: (name,) for name in TIBIAL_REGIONS + FEMORAL_REGIONS},
  **TOTALS,
}
MEASURES = (
  'thickness_cab_mm',
  'thickness_tab_mm',
  'volume_mm3',
  'cab_mm2',
  'tab_mm2',
  'denuded_percent',
)


@dataclasses.dataclass
class SurfaceGrid:
  """One plate's analytic surface on a parameter grid (model frame).

  axes: the two axis arrays (femur theta deg, x mm; tibia x mm, y mm). points [A, B, 3] (NaN:
  no surface), area [A, B] (mm^2 of bone surface per node, 0 where unknown), base [A, B]: the
  thickness without any follow-up thinning (every other factor applied).
  """

  plate: str
  axes: tuple[Array, Array]
  points: Array
  area: Array
  base: Array


def surface_grids(model) -> dict[str, SurfaceGrid]:
  """The femoral and tibial grids of `model` (a knee_anatomy.KneeModel), thickness unthinned."""
  saved = model.thinning
  model.thinning = None
  try:
    fem = model.femoral_grid(FEMUR_STEP_DEG, FEMUR_STEP_MM, ray_step=1.0)
    tib = model.tibial_grid(TIBIA_STEP_MM)
  finally:
    model.thinning = saved
  return {
    'femur': SurfaceGrid(
      'femur',
      (fem['theta_deg'], fem['x_mm']),
      fem['points'],
      _area(fem['points']),
      fem['thickness'],
    ),
    'tibia': SurfaceGrid(
      'tibia', (tib['x_mm'], tib['y_mm']), tib['points'], _area(tib['points']), tib['thickness']
    ),
  }


def _area(points: Array) -> Array:
  """Bone-surface area per node, |dP/da x dP/db| (central differences, one-sided at the
  grid's edges); 0 where a point or a neighbour is missing."""
  da = np.gradient(points, axis=0)
  db = np.gradient(points, axis=1)
  area = np.linalg.norm(np.cross(da, db), axis=-1)
  return np.where(np.isfinite(area), area, 0.0)


def region_masks(grids: Mapping[str, SurfaceGrid]) -> dict[str, tuple[str, Array]]:
  """name -> (plate, bool mask over that plate's grid) for every region metrics.subregions
  defines (module docstring): MT, LT and their five subregions; cMF, cLF, their thirds, pMF,
  pLF and TrF. Coverage is the unthinned thickness > 0 (thinning never uncovers a node, so
  every visit of a knee has the same masks)."""
  from imask_jax.metrics import subregions
  from imask_jax.metrics.thickness import InterfaceThickness
  from imask_jax.metrics.thickness_maps import ThicknessMap

  def as_map(thickness: Array, rows: Array, cols: Array) -> ThicknessMap:
    return ThicknessMap(
      thickness_mm=np.where(thickness > 0, thickness, np.nan),
      row_edges=_edges(rows),
      col_edges=_edges(cols),
      row_name='rows',
      col_name='cols',
      mean_thickness_mm=math.nan,
      points=InterfaceThickness(np.zeros((0, 3)), np.zeros(0)),
    )

  fem, tib = grids['femur'], grids['tibia']
  out: dict[str, tuple[str, Array]] = {}
  femoral = subregions.femoral_regions(as_map(fem.base, *fem.axes), 'right')
  out.update({k: ('femur', v) for k, v in femoral.items()})
  # The tibial map's rows are anterior (model y), its columns lateral (model x).
  tibial = subregions.tibial_regions(as_map(tib.base.T, tib.axes[1], tib.axes[0]), 'right')
  out.update({k: ('tibia', v.T) for k, v in tibial.items()})
  return out


def _edges(centres: Array) -> Array:
  step = float(centres[1] - centres[0])
  return np.concatenate([centres - step / 2, centres[-1:] + step / 2])


def region_thickness(
  grids: Mapping[str, SurfaceGrid],
  thickness: Mapping[str, Array],
  masks: Mapping[str, tuple[str, Array]],
) -> dict[str, dict[str, float | None]]:
  """Every region's measures (MEASURES; None where undefined) from the thickness per plate,
  the regions and the totals MFTC, LFTC, FTJ (area and volume sums)."""
  sums = {}
  for name, (plate, mask) in masks.items():
    t, area = thickness[plate], grids[plate].area
    covered = mask & (t > 0)
    sums[name] = (
      float((t * area)[covered].sum()),
      float(area[covered].sum()),
      float(area[mask].sum()),
    )
  for name, parts in TOTALS.items():
    sums[name] = tuple(sum(sums[p][i] for p in parts) for i in range(3))
  out = {}
  for name, (volume, cab, tab) in sums.items():
    out[name] = {
      'thickness_cab_mm': volume / cab if cab else None,
      'thickness_tab_mm': volume / tab if tab else None,
      'volume_mm3': volume,
      'cab_mm2': cab,
      'tab_mm2': tab,
      'denuded_percent': 100.0 * (tab - cab) / tab if tab else None,
    }
  return out


# ----------------------------------------------------------------------------- thinning


def check_thinning(thinning: Mapping[str, float] | None, where: str) -> dict[str, float]:
  """The thinning as {region: mm}; ValueError for an unknown name or an amount outside
  [0, MAX_THINNING_MM]."""
  if not thinning:
    return {}
  if not isinstance(thinning, Mapping):
    raise ValueError(f'{where}: thinning={thinning!r}; expected a mapping region -> mm')
  out = {}
  for name, amount in thinning.items():
    if name not in THINNABLE:
      raise ValueError(
        f'{where}: thinning region {name!r} is not a femorotibial region; expected some of '
        f'{sorted(THINNABLE)}'
      )
    value = float(amount)
    if not (math.isfinite(value) and 0 <= value <= MAX_THINNING_MM):
      raise ValueError(
        f'{where}: thinning {name}={amount!r} mm; expected 0 to {MAX_THINNING_MM} mm'
      )
    out[str(name)] = value
  return out


@dataclasses.dataclass
class ThinningZone:
  """The amount to take off (mm) on one plate's parameter grid; `amount_at` interpolates it
  bilinearly (0 off the grid)."""

  axes: tuple[Array, Array]
  amount: Array  # float32 [A, B]

  def amount_at(self, u: Array, v: Array) -> Array:
    a0, a1 = self.axes
    idx = np.stack(
      [
        (np.asarray(u, np.float64) - a0[0]) / (a0[1] - a0[0]),
        (np.asarray(v, np.float64) - a1[0]) / (a1[1] - a1[0]),
      ]
    ).reshape(2, -1)
    out = ndimage.map_coordinates(self.amount, idx, order=1, mode='constant', cval=0.0)
    return out.reshape(np.shape(u)).astype(np.float32)


def region_weight(plate: str, mask: Array, scale: float) -> Array:
  """float32 [A, B] weight of a region's thinning zone: 1 on the region's nodes and within the
  plate's margin (FEMUR_MARGIN, TIBIA_MARGIN) of them, falling to 0 (smoothstep) at twice the
  margin. Distances are over the parameter grid, each axis in units of its margin."""
  if not mask.any():
    return np.zeros(mask.shape, np.float32)
  # The x (and y) axes are in model mm, FEMUR_STEP_MM (TIBIA_STEP_MM) x scale apart.
  if plate == 'femur':
    sampling = (FEMUR_STEP_DEG / FEMUR_MARGIN[0], FEMUR_STEP_MM * scale / FEMUR_MARGIN[1])
  else:
    step = TIBIA_STEP_MM * scale / TIBIA_MARGIN
    sampling = (step, step)
  distance = ndimage.distance_transform_edt(~mask, sampling=sampling)
  return sdf.smoothstep(2.0, 1.0, distance.astype(np.float32)).astype(np.float32)


def thinning_zones(
  grids: Mapping[str, SurfaceGrid],
  masks: Mapping[str, tuple[str, Array]],
  thinning: Mapping[str, float],
  scale: float,
) -> dict[str, ThinningZone]:
  """plate -> ThinningZone: the sum over the named regions of amount x region_weight (a name
  of TOTALS thins each of its parts)."""
  amounts: dict[str, Array] = {}
  for name, mm in thinning.items():
    if mm == 0:
      continue
    for part in THINNABLE[name]:
      plate, mask = masks[part]
      add = np.float32(mm) * region_weight(plate, mask, scale)
      amounts[plate] = amounts.get(plate, 0) + add
  return {
    plate: ThinningZone(grids[plate].axes, np.asarray(amount, np.float32))
    for plate, amount in amounts.items()
  }


def thin(thickness: Array, amount: Array) -> Array:
  """thickness - amount, but never less than (1 - MAX_THINNING_SHARE) x thickness."""
  take = np.minimum(amount, np.float32(MAX_THINNING_SHARE) * thickness)
  return (thickness - take).astype(np.float32)


# ----------------------------------------------------------------------------- the sidecar


def subregion_truth(
  model,
  grids: Mapping[str, SurfaceGrid],
  masks: Mapping[str, tuple[str, Array]],
) -> dict[str, Any]:
  """The sidecar's 'subregion_thickness' block: this visit's analytic measures per region,
  the baseline's, and the drawn change (this visit - baseline) of each measure."""
  base = {p: g.base for p, g in grids.items()}
  now = {
    p: model.thinned(p, g.base, *np.meshgrid(*g.axes, indexing='ij')) for p, g in grids.items()
  }
  at_visit = region_thickness(grids, now, masks)
  at_baseline = region_thickness(grids, base, masks)
  change = {}
  for name, measures in at_visit.items():
    change[name] = {
      k: (
        None
        if measures[k] is None or at_baseline[name][k] is None
        else _round(measures[k] - at_baseline[name][k])
      )
      for k in ('thickness_cab_mm', 'thickness_tab_mm', 'volume_mm3')
    }
  return {
    'meaning': 'analytic: the rules of imask_jax.metrics.subregions applied to the thickness '
    'fields sampled on model-frame surface grids (femur every '
    f'{FEMUR_STEP_DEG:g} deg of theta x {FEMUR_STEP_MM:g} mm of x, tibia every '
    f'{TIBIA_STEP_MM:g} mm of x and y, x scale); covered = thickness > 0; measures weighted '
    'by the bone-surface area of each node; see docs/phantoms.md "Follow-ups"',
    'regions': {name: _rounded(m) for name, m in at_visit.items()},
    'baseline': {name: _rounded(m) for name, m in at_baseline.items()},
    'drawn_change': change,
  }


def _round(value: float) -> float:
  return float(round(value, 6))


def _rounded(measures: Mapping[str, float | None]) -> dict[str, float | None]:
  return {k: None if v is None else _round(v) for k, v in measures.items()}
