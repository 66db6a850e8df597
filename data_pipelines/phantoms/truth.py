"""Builds the truth sidecar's pieces: tissue and effusion volumes, thickness field entries.

Volumes come in two kinds: `volume_ml` = voxel count x voxel volume of the label map (what a
perfect segmentation would measure), and `volume_ml_continuous` = the sum of the tissue's
partial-volume fractions x voxel volume (an estimate of the continuous shape's volume; within
about 1 % for shapes several voxels thick, biased high for films thinner than a voxel, where the
linear partial-volume ramp overlaps itself).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines.phantoms import scene

Array = np.ndarray


def _r(v: float, digits: int = 4) -> float:
  return float(round(float(v), digits))


def grid_entries(grid: scene.Grid, acquisition: dict[str, Any], axis_codes: Any) -> dict[str, Any]:
  """The sidecar's grid and acquisition keys, in the order both phantoms write them: shape,
  spacing, field of view, PSF FWHM, axis codes, the voxel -> world affine and the model ->
  world pose."""
  return {
    'shape': list(grid.shape),
    'spacing_mm': list(grid.spacing),
    'fov_mm': list(acquisition['fov_mm']),
    'psf_fwhm_mm': list(acquisition['fwhm']),
    'axis_codes': list(axis_codes),
    'affine': grid.affine.tolist(),
    'model_to_world': grid.model_to_world.tolist(),
  }


def tissue_volumes(
  rendered: scene.Rendered, layers: list[scene.Layer], grid: scene.Grid, labels: dict[str, int]
) -> dict[str, dict[str, float]]:
  """name -> {value, voxels, volume_ml, volume_ml_continuous} for every non-background label."""
  counts = np.bincount(rendered.labels.ravel(), minlength=max(labels.values()) + 1)
  out = {}
  for name, value in labels.items():
    if value == 0:
      continue
    frac = sum(f for f, layer in zip(rendered.fraction_sum, layers) if layer.label == value)
    out[name] = {
      'value': int(value),
      'voxels': int(counts[value]),
      'volume_ml': _r(counts[value] * grid.voxel_ml),
      'volume_ml_continuous': _r(frac * grid.voxel_ml),
    }
  return out


def effusion_pockets(
  rendered: scene.Rendered, names: list[str], pockets: list[str], grid: scene.Grid
) -> dict[str, Any]:
  """Per-pocket and total effusion volume (label map and continuous)."""
  per = []
  for pocket in pockets:
    i = names.index(pocket)
    per.append(
      {
        'name': pocket,
        'voxels': int(rendered.voxels[i]),
        'volume_ml': _r(rendered.voxels[i] * grid.voxel_ml),
        'volume_ml_continuous': _r(rendered.fraction_sum[i] * grid.voxel_ml),
      }
    )
  total_vox = sum(p['voxels'] for p in per)
  return {
    'pockets': per,
    'total_voxels': int(total_vox),
    'total_ml': _r(total_vox * grid.voxel_ml),
    'total_ml_continuous': _r(sum(p['volume_ml_continuous'] for p in per)),
  }


def _replace_nan(x):
  """Nested lists with NaN -> None (JSON has no NaN)."""
  if isinstance(x, list):
    return [_replace_nan(v) for v in x]
  return None if x != x else x


def thickness_entry(
  g: dict[str, Array], grid: scene.Grid, axes: tuple[str, str], meaning: str
) -> dict[str, Any]:
  """A thickness field on a parameter grid, with surface points and normals in world RAS mm.

  g holds the two axis arrays (names in `axes`), points/normals [A, B, 3] in the model frame
  and thickness [A, B] (mm). Points and normals are written only where thickness > 0. The
  mean thickness is weighted by the surface area of each node (|dP/da x dP/db| from the
  surface points), over the nodes where thickness > 0.
  """
  m = grid.model_to_world
  pts = g['points'] @ m[:3, :3].T + m[:3, 3]
  nrm = g['normals'] @ m[:3, :3].T
  t = g['thickness']
  da = np.gradient(pts, axis=0)
  db = np.gradient(pts, axis=1)
  area = np.linalg.norm(np.cross(da, db), axis=-1)
  use = (t > 0) & np.isfinite(area)
  mean = float((t[use] * area[use]).sum() / area[use].sum()) if use.any() else 0.0
  bare = (t <= 0)[..., None]
  return {
    'axes': list(axes),
    axes[0]: np.round(g[axes[0]], 4).tolist(),
    axes[1]: np.round(g[axes[1]], 4).tolist(),
    'meaning': meaning,
    'thickness_mm': _replace_nan(np.round(t, 3).tolist()),
    # Surface points and normals only where there is cartilage (null elsewhere).
    'surface_points_ras_mm': _replace_nan(np.round(np.where(bare, np.nan, pts), 2).tolist()),
    'surface_normals_ras': _replace_nan(np.round(np.where(bare, np.nan, nrm), 3).tolist()),
    'mean_thickness_mm': _r(mean),
    'max_thickness_mm': _r(t.max()),
    'covered_area_mm2': _r(float(area[use].sum()), 1),
  }
