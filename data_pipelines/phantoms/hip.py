"""Coronal STIR-like phantom of both hips with joint effusion (the only labelled class), with
bone-marrow oedema and synovial thickening as unlabelled findings in some hips. STIR contrast:
fat and fatty marrow dark, fluid very bright.

This module is the generator (presets, the scanner grid and pose, textures, `generate_hip`, the
sidecar); the hips' parameters, model frame, findings and geometry are hip_anatomy.py, their
render layers hip_layers.py, the scanner's part mri.py.

Two simulated readers outline the effusion the way the paper's readers did (region drawn,
Otsu threshold inside it, each with a habit of their own): `hip_readers.py`.
The generator's settings and ranges: docs/phantoms.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipelines import tissues
from data_pipelines.phantoms import hip_readers, mri, scene, sdf
from data_pipelines.phantoms import truth as truth_lib
from data_pipelines.phantoms.hip_anatomy import HipModel
from data_pipelines.phantoms.hip_layers import build_layers

Array = np.ndarray
# 1.1: each hip's joint fluid film is its own (1.0 drew the last side's film for both).
# 1.2: bone-marrow oedema and synovial thickening; readers draw a region and threshold it.
GENERATOR_VERSION = '1.2'
SEQUENCE = 'STIR'
PLANE = 'coronal'
LABELS = tissues.HIP_LABELS

# Array axes: 0 superior->inferior, 1 right->left, 2 posterior->anterior (codes I, L, A).
PRESETS = {
  'cpu': dict(shape=(160, 160, 20), spacing=(2.2, 2.2, 3.0), noise=16.0, fwhm=(2.0, 2.0, 2.0)),
  'full': dict(shape=(384, 384, 24), spacing=(0.91, 0.91, 3.0), noise=30.0, fwhm=(1.0, 1.0, 2.0)),
}
AXIS_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # I, L, A (RAS)
AXIS_CODES = ('I', 'L', 'A')


def make_grid(
  rng: np.random.Generator,
  preset: str,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
) -> scene.Grid:
  """Scanner grid for the preset (optionally another in-plane spacing and field of view, see
  `mri.acquisition`); the pelvis gets a small random rotation and shift.

  The grid's central voxel position is the world origin whatever its shape, so a larger field
  of view grows symmetrically about the same point of the pelvis.
  """
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_hip')
  affine = mri.grid_affine(p['shape'], p['spacing'], AXIS_DIRECTIONS, np.zeros(3))
  rot = sdf.rotation(*rng.uniform(-4, 4, 3))
  focus = np.array([0.0, 0.0, -15.0])
  translation = -rot @ focus + rng.uniform(-5, 5, 3)
  return scene.Grid(tuple(p['shape']), affine, mri.pose_matrix(rot, translation))


def make_textures(shape, spacing, rng: np.random.Generator) -> dict[str, Array]:
  """Shared random texture fields (unit std), sized in mm."""
  sp = np.asarray(spacing)
  return {
    'fine': mri.texture(shape, rng, tuple(np.maximum(0.8 / sp, 0.5))),
    'coarse': mri.texture(shape, rng, tuple(4.0 / sp)),
    'striated': mri.texture(shape, rng, tuple(np.array([8.0, 1.0, 2.0]) / sp)),
    'septa': mri.texture(shape, rng, tuple(np.array([12.0, 4.0, 4.0]) / sp)),
  }


def generate_hip(
  seed: int,
  preset: str = 'cpu',
  *,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  oedema: tuple[bool, bool] | None = None,
  synovitis: tuple[bool, bool] | None = None,
) -> scene.Phantom:
  """One coronal STIR-like volume of both hips; identical output for identical arguments.

  oedema, synovitis (right, left): force the findings on or off instead of drawing them (the
  rest of the scan is the same either way).

  spacing_mm, fov_mm (optional, mm): in-plane pixel spacing and field of view (array axes 0
  and 1, the coronal plane) instead of the preset's; the in-plane shape becomes
  round(fov_mm / spacing_mm), the field of view stays centred on the same point of the pelvis,
  the in-plane PSF FWHM keeps the preset's FWHM / spacing ratio, and the slices (count,
  thickness) and the noise sigma stay the preset's. The anatomy and its pose do not depend on
  them; the texture, bias, noise and reader realisations do. Without them the output is the
  preset's.
  """
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_hip')
  ref = PRESETS[preset]
  rng = np.random.default_rng(seed)
  model = HipModel(rng, oedema=oedema, synovitis=synovitis)
  grid = make_grid(rng, preset, spacing_mm, fov_mm)
  sc = scene.Scene(grid, ramp_mm=float(np.mean(p['spacing'][:2])))
  sc.textures = make_textures(grid.shape, grid.spacing, rng)
  layers, pockets, bones = build_layers(model, sc)
  rendered = scene.render(sc, layers, background=0.0)
  image = mri.scanner_image(
    rendered.image, grid.spacing, p, ref, rng, bias_strength=0.12, coil_falloff=0.25
  )
  names = [layer.name for layer in layers]
  blocked = np.isin(rendered.owner, bones)
  readers, reader_info = hip_readers.reader_labels(
    image,
    rendered.labels,
    rendered.owner,
    {names.index(n): n for n in pockets},
    blocked,
    grid.spacing,
    rng,
  )
  truth = hip_truth(model, grid, layers, rendered, pockets, readers, reader_info, seed, preset, p)
  return scene.Phantom(
    image=image, labels=rendered.labels, affine=grid.affine, reader_labels=readers, truth=truth
  )


def hip_truth(
  model: HipModel,
  grid: scene.Grid,
  layers,
  rendered: scene.Rendered,
  pockets: list[str],
  readers: dict[str, Array],
  reader_info: dict[str, Any],
  seed: int,
  preset: str,
  acquisition: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The sidecar: effusion per pocket, per side and in total, reader volumes, geometry.

  acquisition: `mri.acquisition`'s result for the grid (default: the preset's).
  """
  acq = acquisition or mri.acquisition(PRESETS, preset)
  names = [layer.name for layer in layers]
  effusion = truth_lib.effusion_pockets(rendered, names, pockets, grid)
  per_side = {}
  for s in model.sides:
    mine = [p for p in effusion['pockets'] if p['name'].startswith(f'effusion_{s.name}_')]
    per_side[s.name] = {
      'voxels': sum(p['voxels'] for p in mine),
      'volume_ml': round(sum(p['voxels'] for p in mine) * grid.voxel_ml, 4),
    }
  effusion['per_side'] = per_side
  reader_out = {}
  for r, lab in readers.items():
    n = int((lab == 1).sum())
    reader_out[r] = dict(reader_info[r], voxels=n, volume_ml=round(n * grid.voxel_ml, 4))
  return {
    'generator': 'data_pipelines.phantoms.hip',
    'generator_version': GENERATOR_VERSION,
    'kind': 'hip',
    'seed': int(seed),
    'preset': preset,
    'sequence': 'STIR-like',
    'plane': PLANE,
    **truth_lib.grid_entries(grid, acq, AXIS_CODES),
    'labels': LABELS,
    'tissues': truth_lib.tissue_volumes(rendered, layers, grid, LABELS),
    'effusion': effusion,
    'readers': reader_out,
    'anatomy': {
      s.name: {
        'head_centre_model_mm': np.round(s.head, 3).tolist(),
        'head_radius_mm': round(s.head_r, 3),
        'pocket_targets_ml': {p['name']: round(p['target_ml'], 4) for p in s.pockets},
        'cysts': len(s.cysts),
        'oedema': [
          {
            'where': lesion['where'],
            'centre_model_mm': np.round(lesion['centre'], 3).tolist(),
            'radii_mm': [round(r, 3) for r in lesion['radii']],
            'peak_fraction_of_fluid': round(lesion['peak'], 4),
          }
          for lesion in s.oedema
        ],
        'synovium_mm': round(s.synovium_mm, 3),
      }
      for s in model.sides
    },
  }
