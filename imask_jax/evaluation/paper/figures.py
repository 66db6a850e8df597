"""The paper's Figures 6-8 for one case of evaluated runs (label_maps.py reads and measures;
this module only draws, with viz's canvas, map panel and atomic writer).

Conventions (`convention`), the paper's the default of the paper command:
  'paper'  Figure 8's difference maps are truth - prediction on a blue-white-red scale, so red
           = the model under-estimates, blue = over-estimates, white = no difference (the
           paper's Figure 8 legend); Figure 7's femoral map is the angle around the condylar
           cylinder against the slice number (the paper's Figure 7c), the femoral panels of
           Figure 8 too.
  'ours'   what evaluate's thickness figures show: prediction - truth (red = over-estimates)
           against the position along the cylinder's axis in mm.
Figure 6 is the same in both: each model's surface coloured by its signed distance to the
truth's surface, red = over-estimation, blue = under-estimation, white = none (the paper's
Figure 6 legend and surface.py's sign)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imask_jax.evaluation import viz
from imask_jax.evaluation.paper.label_maps import CaseMaps, signed_surface_points
from imask_jax.evaluation.paper.runs import display_name
from imask_jax.evaluation.paper.thickness import CONVENTIONS
from imask_jax.metrics.thickness_maps import PlateComparison, ThicknessMap

MAX_POINTS = 20000  # surface points drawn per panel of Figure 6 (an even subsample beyond)


def difference_values(comparison: PlateComparison, convention: str) -> np.ndarray:
  """The difference map in the convention's sign: truth - prediction ('paper'), prediction -
  truth ('ours')."""
  if convention not in CONVENTIONS:
    raise ValueError(f'convention {convention!r}; expected one of {CONVENTIONS}')
  values = comparison.difference.difference_mm
  return -values if convention == 'paper' else values


def femoral_in_slices(thickness_map: ThicknessMap, spacing: Sequence[float]) -> ThicknessMap:
  """A femoral map with its columns in slice numbers (canonical left-right index, the sagittal
  slice the evaluation cut) instead of mm along the cylinder's axis: x = centre_x + axial *
  axis_x, slice = x / spacing_x. The axis is fitted to the condyles and nearly left-right; where
  it tilts, a column spans cos(tilt) of a slice's width per mm (exact to first order)."""
  cylinder = thickness_map.cylinder
  if cylinder is None:
    raise ValueError('femoral_in_slices: the map has no cylinder (not a femoral map)')
  edges = (cylinder.center_mm[0] + thickness_map.col_edges * cylinder.axis[0]) / float(spacing[0])
  return dataclasses.replace(thickness_map, col_edges=edges, col_name='slice')


def _cartilage_rows(ax, thickness_map: ThicknessMap) -> None:
  """Limit a femoral panel to the angles that hold cartilage."""
  rows = np.flatnonzero(np.isfinite(thickness_map.thickness_mm).any(axis=1))
  if rows.size:
    ax.set_ylim(thickness_map.row_edges[rows[0]], thickness_map.row_edges[rows[-1] + 1])


def _oriented(m: ThicknessMap, plate: str, spacing: Sequence[float], convention: str):
  return femoral_in_slices(m, spacing) if plate == 'femoral' and convention == 'paper' else m


def _top(maps: Sequence[np.ndarray]) -> float:
  finite = [m[np.isfinite(m)] for m in maps]
  return max([float(v.max()) for v in finite if v.size] + [1e-3])


def figure7(
  path: str, maps: CaseMaps, comparisons: Mapping[str, Mapping[str, Any]], convention: str
) -> str:
  """Flattened femoral cartilage thickness maps: the truth, then each model's."""
  femoral = {name: c['femoral'] for name, c in comparisons.items()}
  first = next(iter(femoral.values()))
  panels = [('truth', first.truth)] + [(display_name(n), c.pred) for n, c in femoral.items()]
  top = _top([m.thickness_mm for _, m in panels])
  figure = viz.new_figure(5.0 * len(panels), 4.2)
  axes = np.atleast_1d(figure.subplots(1, len(panels)))
  for ax, (label, m) in zip(axes, panels):
    shown = _oriented(m, 'femoral', maps.spacing, convention)
    title = f'{label}: mean {m.mean_thickness_mm:.2f} mm'
    viz.draw_map(figure, ax, m.thickness_mm, shown, 'viridis', 0.0, top, title, 'thickness (mm)')
    _cartilage_rows(ax, shown)
  axis = 'slice number' if convention == 'paper' else 'position along the cylinder axis (mm)'
  figure.suptitle(
    f'{maps.case_id}: femoral cartilage thickness, angle around the condylar cylinder '
    f'against the {axis}',
    fontsize=10,
  )
  figure.tight_layout(rect=(0, 0, 1, 0.93))
  return viz.save(figure, path)


def figure8(
  path: str, maps: CaseMaps, comparisons: Mapping[str, Mapping[str, Any]], convention: str
) -> str:
  """Per plate: the truth map, then per model its map and its difference map."""
  plates = ('femoral', 'tibial')
  names = list(comparisons)
  columns = 1 + 2 * len(names)
  figure = viz.new_figure(4.2 * columns, 3.6 * len(plates))
  axes = np.atleast_2d(figure.subplots(len(plates), columns))
  if convention == 'paper':
    legend = 'difference = truth - prediction: red = under-estimation, blue = over-estimation'
  else:
    legend = 'difference = prediction - truth: red = over-estimation, blue = under-estimation'
  for row, plate in zip(axes, plates):
    own: dict[str, PlateComparison] = {n: comparisons[n][plate] for n in names}
    first = own[names[0]]
    top = _top([first.truth.thickness_mm] + [c.pred.thickness_mm for c in own.values()])
    diffs = [difference_values(c, convention) for c in own.values()]
    span = max(_top([np.abs(d) for d in diffs]), 0.05)
    panels = [(first.truth, first.truth.thickness_mm, 'viridis', 0.0, top, 'truth', 'mm')]
    for name, diff in zip(names, diffs):
      c = own[name]
      panels.append((c.truth, c.pred.thickness_mm, 'viridis', 0.0, top, display_name(name), 'mm'))
      mean = float(np.nanmean(diff)) if np.isfinite(diff).any() else float('nan')
      panels.append(
        (c.truth, diff, 'RdBu_r', -span, span, f'{display_name(name)} difference {mean:+.2f}', 'mm')
      )
    for ax, (grid, values, cmap, vmin, vmax, title, unit) in zip(row, panels):
      shown = _oriented(grid, plate, maps.spacing, convention)
      viz.draw_map(figure, ax, values, shown, cmap, vmin, vmax, f'{plate}: {title}', unit)
      if plate == 'femoral':
        _cartilage_rows(ax, shown)
  figure.suptitle(f'{maps.case_id}: cartilage thickness maps (mm); {legend}', fontsize=10)
  figure.tight_layout(rect=(0, 0, 1, 0.95))
  return viz.save(figure, path)


def _subsample(points: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  if len(points) <= MAX_POINTS:
    return points, values
  keep = np.linspace(0, len(points) - 1, MAX_POINTS).astype(int)
  return points[keep], values[keep]


def figure6(path: str, maps: CaseMaps, tissues: Sequence[int] | None = None) -> str:
  """The truth's surfaces, then each model's surfaces coloured by the signed distance to the
  truth's (mm; red = over-estimation, blue = under-estimation, white = none), 3D views on grey
  panes; the colour scale ends at the 95th percentile of |distance| (at least 0.5 mm)."""
  scheme = maps.scheme
  values = list(tissues or scheme.names_by_value)
  import matplotlib

  from imask_jax import metrics

  truth = np.isin(maps.truth, values)
  panels = []
  for name, pred in maps.predictions.items():
    mask = np.isin(pred, values)
    if not mask.any() or not truth.any():
      panels.append((display_name(name), np.zeros((0, 3)), np.zeros(0)))
      continue
    # Per tissue, so that a femur voxel is compared with the femur's truth surface.
    parts = [
      signed_surface_points(pred == v, maps.truth == v, maps.spacing)
      for v in values
      if (pred == v).any() and (maps.truth == v).any()
    ]
    points = np.concatenate([p for p, _ in parts])
    signed = np.concatenate([s for _, s in parts])
    panels.append((display_name(name), *_subsample(points, signed)))
  span = max([float(np.percentile(np.abs(s), 95)) for _, _, s in panels if s.size] + [0.5])
  figure = viz.new_figure(4.8 * (len(panels) + 1), 4.6)

  spacing = np.asarray(maps.spacing, float)
  present = [v for v in values if (maps.truth == v).any()]
  borders = [(metrics.surface_voxels(maps.truth == v), v) for v in present]
  truth_points = np.concatenate([np.argwhere(b) * spacing for b, _ in borders] + [np.zeros((0, 3))])
  truth_labels = np.concatenate([np.full(int(b.sum()), v) for b, v in borders] + [np.zeros(0)])
  truth_points, truth_labels = _subsample(truth_points, truth_labels)
  ax = figure.add_subplot(1, len(panels) + 1, 1, projection='3d')
  ax.scatter(*truth_points.T, c=truth_labels, cmap='tab10', s=0.5, vmin=0, vmax=10)
  ax.set_title('truth', fontsize=9)
  cmap = matplotlib.colormaps['RdBu_r']
  for k, (label, points, signed) in enumerate(panels):
    ax = figure.add_subplot(1, len(panels) + 1, k + 2, projection='3d')
    image = ax.scatter(*points.T, c=signed, cmap=cmap, vmin=-span, vmax=span, s=0.5)
    ax.set_title(f'{label}: signed distance to the truth', fontsize=9)
    bar = figure.colorbar(image, ax=ax, shrink=0.6, pad=0.12, extend='both')
    bar.set_label('mm (+ = over-estimation)', fontsize=8)
  for ax in figure.axes:
    if hasattr(ax, 'set_zlabel'):
      for pane in (ax.xaxis, ax.yaxis, ax.zaxis):  # white (no difference) must show
        pane.set_pane_color((0.55, 0.55, 0.55, 1.0))
      ax.set_xlabel('R (mm)', fontsize=7)
      ax.set_ylabel('A (mm)', fontsize=7)
      ax.set_zlabel('S (mm)', fontsize=7)
      ax.tick_params(labelsize=6)
  names = ', '.join(scheme.names_by_value[v] for v in values)
  figure.suptitle(
    f'{maps.case_id}: surfaces of {names}; red = over-estimation, blue = under-estimation, '
    'white = no difference',
    fontsize=10,
  )
  return viz.save(figure, path)


def write(
  out: str, figure: int, maps: CaseMaps, comparisons: Mapping[str, Any] | None, convention: str
) -> str:
  """Writes figure 6, 7 or 8 of `maps` as OUT/figure<N>_<case>.png; returns the path."""
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in maps.case_id)
  path = os.path.join(out, f'figure{figure}_{safe}.png')
  if figure == 6:
    return figure6(path, maps)
  if figure == 7:
    return figure7(path, maps, comparisons or {}, convention)
  return figure8(path, maps, comparisons or {}, convention)
