"""Figures of an evaluation as PNG: truth-vs-prediction overlays and cartilage thickness maps.

Colour code of the overlays (the paper's Figures 9-10): green = reader (truth) only, red =
model only, blue = both; the grey MRI slice elsewhere. Thickness maps: truth and prediction on
one colour scale (mm), and the prediction - truth difference on a symmetric blue-white-red
scale (red = the model measures thicker). Cells without cartilage are light grey.

Every figure is drawn on a matplotlib `Figure` with the Agg canvas (no pyplot state, no
display) and written atomically; so are the Bland-Altman plots of reader agreement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np

from data_pipelines.atomic import atomic_path
from imask_jax.metrics.thickness_maps import PlateComparison, ThicknessMap
from imask_jax.metrics.volume import BlandAltman

TRUTH_ONLY = np.array([0.0, 0.85, 0.0])  # green
MODEL_ONLY = np.array([0.95, 0.0, 0.0])  # red
BOTH = np.array([0.1, 0.35, 1.0])  # blue
MISSING_CELL = '#d9d9d9'


def display_range(
  image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[float, float]:
  """Grey-level window (low, high) of an image or volume from its intensity percentiles."""
  low, high = np.percentile(np.asarray(image, np.float32), percentiles)
  return float(low), float(max(high, low + 1e-6))


def grey(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
  """float [h, w] -> float32 [h, w] in [0, 1] through the window (low, high)."""
  low, high = window
  return np.clip((np.asarray(image, np.float32) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(
  image: np.ndarray, truth: np.ndarray, pred: np.ndarray, opacity: float = 0.6
) -> np.ndarray:
  """uint8 [h, w, 3]: the grey slice `image` ([h, w] in [0, 1]) with truth-only pixels green,
  model-only red and shared blue, blended at `opacity`."""
  image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
  truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
  if image.shape != truth.shape or image.shape != pred.shape:
    raise ValueError(
      f'overlay_rgb: image {image.shape}, truth {truth.shape} and pred '
      f'{pred.shape} must have one shape [h, w]'
    )
  rgb = np.repeat(image[..., None], 3, axis=-1)
  for where, colour in (
    (truth & ~pred, TRUTH_ONLY),
    (pred & ~truth, MODEL_ONLY),
    (truth & pred, BOTH),
  ):
    rgb[where] = (1 - opacity) * rgb[where] + opacity * colour
  return np.round(rgb * 255).astype(np.uint8)


def new_figure(width: float, height: float, dpi: int = 120):
  # The Figure/Agg canvas pair needs no pyplot state or display, so it is safe in workers.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(width, height), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def save(figure, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not path.lower().endswith('.png'):
    raise ValueError(f'figure path {path!r} must end in .png')
  with atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')
  return path


def save_overlay_figure(
  path: str | os.PathLike,
  image: np.ndarray,
  truth_labels: np.ndarray,
  pred_labels: np.ndarray,
  names_by_value: Mapping[int, str],
  title: str,
) -> str:
  """One slice: the image, then one overlay panel per tissue (label value -> name), each with
  its slice Dice. image float [h, w] in [0, 1]; label maps int [h, w]. Returns the path."""
  panels = len(names_by_value) + 1
  figure = new_figure(2.6 * panels, 3.0)
  axes = figure.subplots(1, panels, squeeze=False)[0]
  axes[0].imshow(image, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  axes[0].set_title('image', fontsize=9)
  for ax, (value, name) in zip(axes[1:], names_by_value.items()):
    truth, pred = truth_labels == value, pred_labels == value
    denominator = truth.sum() + pred.sum()
    dice = 2 * np.sum(truth & pred) / denominator if denominator else math.nan
    ax.imshow(overlay_rgb(image, truth, pred), interpolation='nearest')
    ax.set_title(f'{name}\nslice Dice {dice:.3f}', fontsize=9)
  for ax in axes:
    ax.set_axis_off()
  figure.suptitle(f'{title}   green = truth only, red = model only, blue = both', fontsize=9)
  figure.tight_layout(rect=(0, 0, 1, 0.92))
  return save(figure, path)


def draw_map(
  figure,
  ax,
  values: np.ndarray,
  thickness_map: ThicknessMap,
  cmap_name: str,
  vmin: float,
  vmax: float,
  title: str,
  unit_label: str,
) -> None:
  import matplotlib

  cmap = matplotlib.colormaps[cmap_name].with_extremes(bad=MISSING_CELL)
  extent = (
    thickness_map.col_edges[0],
    thickness_map.col_edges[-1],
    thickness_map.row_edges[0],
    thickness_map.row_edges[-1],
  )
  image = ax.imshow(
    np.ma.masked_invalid(values),
    origin='lower',
    extent=extent,
    aspect='auto',
    cmap=cmap,
    vmin=vmin,
    vmax=vmax,
    interpolation='nearest',
  )
  ax.set_xlabel(thickness_map.col_name, fontsize=8)
  ax.set_ylabel(thickness_map.row_name, fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.tick_params(labelsize=7)
  figure.colorbar(image, ax=ax, shrink=0.85).set_label(unit_label, fontsize=8)


def save_thickness_figure(
  path: str | os.PathLike, comparison: PlateComparison, plate: str, title: str
) -> str:
  """Truth map, prediction map (one scale, mm) and prediction - truth difference map of one
  plate ('femoral' rows = angle around the condylar cylinder, 0 deg inferior, +90 anterior;
  'tibial' rows = anterior mm, columns = rightward mm). Returns the path."""
  truth, pred, diff = comparison.truth, comparison.pred, comparison.difference
  finite = [m[np.isfinite(m)] for m in (truth.thickness_mm, pred.thickness_mm)]
  top = max([float(v.max()) for v in finite if v.size] + [1e-3])
  diffs = diff.difference_mm[np.isfinite(diff.difference_mm)]
  span = float(np.max(np.abs(diffs))) if diffs.size else 1.0
  figure = new_figure(13.0, 4.0)
  axes = figure.subplots(1, 3)
  draw_map(
    figure,
    axes[0],
    truth.thickness_mm,
    truth,
    'viridis',
    0.0,
    top,
    f'truth: mean {truth.mean_thickness_mm:.2f} mm',
    'thickness (mm)',
  )
  draw_map(
    figure,
    axes[1],
    pred.thickness_mm,
    truth,
    'viridis',
    0.0,
    top,
    f'prediction: mean {pred.mean_thickness_mm:.2f} mm',
    'thickness (mm)',
  )
  draw_map(
    figure,
    axes[2],
    diff.difference_mm,
    truth,
    'RdBu_r',
    -span,
    span,
    f'prediction - truth: {diff.mean_mm:.2f} ± {diff.sd_mm:.2f} mm ({diff.n_cells} cells)',
    'difference (mm)',
  )
  figure.suptitle(f'{title}: {plate} cartilage thickness ({comparison.status})', fontsize=10)
  figure.tight_layout(rect=(0, 0, 1, 0.94))
  return save(figure, path)


def save_subregion_figure(
  path: str | os.PathLike,
  maps: Mapping[str, ThicknessMap | None],
  side: str,
  title: str,
) -> str:
  """The femoral and tibial thickness maps of one knee with the femorotibial subregions'
  outlines (metrics/subregions.py) and each subregion's name and mean thickness (ThCcAB, mm)
  written at its centre. maps: {'femoral': map or None, 'tibial': map or None}. The femoral
  map is cut to the rows that hold cartilage. Returns the path."""
  from imask_jax.metrics import subregions

  finite = [m.thickness_mm[np.isfinite(m.thickness_mm)] for m in maps.values() if m is not None]
  top = max([float(v.max()) for v in finite if v.size] + [1e-3])

  def label(name: str, m: ThicknessMap, mask: np.ndarray) -> str:
    value = subregions.region_measures(m, mask).thickness_cab_mm
    return f'{name}\n{value:.2f}' if math.isfinite(value) else name

  return _subregion_panels(
    path, maps, side, f'{title}: cartilage thickness by subregion', None, label,
    ('viridis', 0.0, top, 'thickness (mm)', 'white'),
  )  # fmt: skip


def save_change_figure(
  path: str | os.PathLike,
  maps: Mapping[str, ThicknessMap | None],
  side: str,
  change_mm: Mapping[str, float],
  title: str,
) -> str:
  """The baseline's femoral and tibial maps with each subregion (metrics/subregions.py) filled
  with its thickness change between two visits (follow-up - baseline, mm; red thinner, blue
  thicker) and the change written at its centre: the regions, not cells, since two visits'
  maps are on grids of their own. Returns the path."""
  finite = [abs(v) for v in change_mm.values() if math.isfinite(v)]
  span = max(finite + [0.05])

  def label(name: str, m: ThicknessMap, mask: np.ndarray) -> str:
    value = change_mm.get(name, math.nan)
    return f'{name}\n{value:+.3f}' if math.isfinite(value) else name

  return _subregion_panels(
    path, maps, side, f'{title}: ThCcAB change by subregion (mm)', change_mm, label,
    ('RdBu', -span, span, 'change (mm)', 'black'),
  )  # fmt: skip


def _subregion_panels(path, maps, side, title, fill, label, style) -> str:
  """One panel per plate map of `maps`: its cells (or, with `fill`, each subregion filled
  with fill[name]), every subregion outlined and labelled `label(name, map, mask)`; style:
  (colormap, vmin, vmax, colour bar label, outline colour)."""
  from imask_jax.metrics import subregions

  cmap_name, vmin, vmax, unit, line = style
  plates = [(k, maps.get(k)) for k in ('femoral', 'tibial') if maps.get(k) is not None]
  figure = new_figure(6.0 * max(len(plates), 1), 5.0)
  axes = np.atleast_1d(figure.subplots(1, max(len(plates), 1)))
  for ax, (plate, m) in zip(axes, plates):
    find = subregions.femoral_regions if plate == 'femoral' else subregions.tibial_regions
    # The subregions, not the plates they make up (MT, LT, cMF, cLF).
    regions = {
      n: mask for n, mask in find(m, side).items() if len(n) > 2 and n not in ('cMF', 'cLF')
    }
    regions = {n: mask for n, mask in regions.items() if mask.any()}
    values = m.thickness_mm
    if fill is not None:
      values = np.full(m.thickness_mm.shape, np.nan)
      for name, mask in regions.items():
        values[mask] = fill.get(name, math.nan)
    draw_map(figure, ax, values, m, cmap_name, vmin, vmax, f'{plate} ({side} knee)', unit)
    x, y = np.meshgrid(m.col_centers, m.row_centers)
    for name, mask in regions.items():
      ax.contour(x, y, mask.astype(float), levels=[0.5], colors=line, linewidths=0.6)
      ax.text(
        x[mask].mean(), y[mask].mean(), label(name, m, mask), color=line, fontsize=6,
        ha='center', va='center',
      )  # fmt: skip
    if plate == 'femoral':  # only the rows with cartilage
      rows = np.flatnonzero(np.isfinite(m.thickness_mm).any(axis=1))
      if rows.size:
        ax.set_ylim(m.row_edges[rows[0]], m.row_edges[rows[-1] + 1])
  figure.suptitle(title, fontsize=10)
  figure.tight_layout(rect=(0, 0, 1, 0.94))
  return save(figure, path)


def save_bland_altman_figure(
  stats: BlandAltman,
  path: str | os.PathLike,
  *,
  name_a: str = 'A',
  name_b: str = 'B',
  unit: str = 'mL',
  title: str | None = None,
) -> str:
  """Writes the Bland-Altman plot of `stats` to the PNG `path` (atomically); returns the path.

  x: mean of the two measurements, y: difference a - b, with the bias and the limits of
  agreement as labelled horizontal lines.
  """
  path = os.fspath(path)
  if not path.lower().endswith('.png'):
    raise ValueError(f'save_bland_altman_figure: path {path!r} must end in .png.')
  figure = new_figure(5.0, 4.0, dpi=150)
  axes = figure.add_subplot()
  axes.scatter(stats.means, stats.differences, s=18, color='tab:blue', alpha=0.8)
  lines = [
    (stats.bias, f'bias {stats.bias:+.2f}', '-'),
    (stats.loa_upper, f'bias + 1.96 SD {stats.loa_upper:+.2f}', '--'),
    (stats.loa_lower, f'bias - 1.96 SD {stats.loa_lower:+.2f}', '--'),
  ]
  for value, label, style in lines:
    axes.axhline(value, color='tab:red', linestyle=style, linewidth=1)
    axes.annotate(
      label,
      xy=(1.0, value),
      xycoords=('axes fraction', 'data'),
      xytext=(-4, 3),
      textcoords='offset points',
      ha='right',
      fontsize=8,
      color='tab:red',
    )
  axes.axhline(0.0, color='grey', linestyle=':', linewidth=0.8)
  axes.set_xlabel(f'mean of {name_a} and {name_b} ({unit})')
  axes.set_ylabel(f'{name_a} - {name_b} ({unit})')
  axes.set_title(title or f'Bland-Altman: {name_a} vs {name_b} (n={stats.means.size})')
  figure.tight_layout()
  with atomic_path(path) as tmp:
    figure.savefig(tmp, format='png')
  return path
