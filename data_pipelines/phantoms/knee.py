"""Sagittal DESS-like knee phantom: femur, tibia, their cartilage and joint effusion, labelled;
patella with its cartilage, menisci, fibula, cruciate and collateral ligaments, tendons,
muscles, vessels, fat and skin around them, unlabelled.

This module is the generator (presets, the scanner grid and pose, textures, `generate_knee`, the
sidecar); the knee's parameters, model frame and geometry are knee_anatomy.py, its render
layers knee_layers.py, the scanner's part mri.py. Settings and ranges: docs/phantoms.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from data_pipelines import tissues
from data_pipelines.phantoms import contrast as contrast_lib
from data_pipelines.phantoms import knee_regions, knee_shapes, mri, scene, sdf
from data_pipelines.phantoms.knee_anatomy import KneeAnatomy, KneeModel, sample_anatomy
from data_pipelines.phantoms.knee_layers import build_layers

Array = np.ndarray
GENERATOR_VERSION = '1.0'
SEQUENCE = 'DESS'
PLANE = 'sagittal'
LABELS = tissues.KNEE_PHANTOM_LABELS

# Acquisition presets. Array axes: 0 superior->inferior, 1 anterior->posterior, 2 right->left
# (codes I, P, L), like a sagittal DICOM series stacked along x.
PRESETS = {
  'cpu': dict(shape=(128, 128, 64), spacing=(0.8, 0.8, 1.5), noise=20.0, fwhm=(0.9, 0.9, 1.2)),
  'full': dict(
    shape=(384, 384, 160), spacing=(0.3646, 0.3646, 0.7), noise=34.0, fwhm=(0.55, 0.55, 0.8)
  ),
}
AXIS_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])  # I, P, L (RAS)
AXIS_CODES = ('I', 'P', 'L')


def make_grid(
  anatomy: KneeAnatomy,
  preset: str,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  pose_change: Array | None = None,
) -> scene.Grid:
  """Scanner grid for the preset (optionally another in-plane spacing and field of view, see
  `mri.acquisition`) and the model -> world pose of this knee.

  The grid's central voxel position is the world origin whatever its shape, so a larger field
  of view grows symmetrically about the same point of the knee. pose_change: a 4x4 rigid world
  -> world transform (a follow-up's repositioning, `draw_pose_change`) applied after the pose.
  """
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_knee')
  affine = mri.grid_affine(p['shape'], p['spacing'], AXIS_DIRECTIONS, np.zeros(3))
  rot = sdf.rotation(*anatomy.pose_deg)
  # The FOV centre (world origin) sits on a model point a little above and in front of the
  # joint centre, so the cropped cpu FOV holds the patella and both plateaus.
  focus = np.array([0.0, 6.0, 6.0]) * anatomy.scale
  mirror = anatomy.side == 'left'
  lin = rot @ (np.diag([-1.0, 1.0, 1.0]) if mirror else np.eye(3))
  translation = -lin @ focus + np.asarray(anatomy.pose_shift_mm)
  model_to_world = mri.pose_matrix(rot, translation, mirror_x=mirror)
  if pose_change is not None:
    model_to_world = np.asarray(pose_change, np.float64) @ model_to_world
  return scene.Grid(tuple(p['shape']), affine, model_to_world)


# A follow-up's repositioning in the scanner: a rotation about a random axis through the centre
# of the field of view (the world origin) and a shift in a random direction, uniform in these
# ranges (degrees, mm).
REPOSITION_DEG = (1.0, 2.0)
REPOSITION_MM = (1.0, 2.0)


def draw_pose_change(rng: np.random.Generator) -> tuple[Array, dict[str, Any]]:
  """A follow-up's repositioning: the 4x4 world -> world transform and its description."""
  axis = rng.normal(size=3)
  axis /= np.linalg.norm(axis)
  angle = float(rng.uniform(*REPOSITION_DEG))
  direction = rng.normal(size=3)
  direction /= np.linalg.norm(direction)
  shift = direction * float(rng.uniform(*REPOSITION_MM))
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  a = math.radians(angle)
  change = np.eye(4)
  change[:3, :3] = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)  # Rodrigues
  change[:3, 3] = shift
  return change, {
    'rotation_axis_ras': [round(float(v), 6) for v in axis],
    'rotation_deg': round(angle, 6),
    'rotation_centre': 'the centre of the field of view (world origin)',
    'shift_mm': [round(float(v), 6) for v in shift],
    'shift_length_mm': round(float(np.linalg.norm(shift)), 6),
  }


def make_textures(shape, spacing, rng: np.random.Generator) -> dict[str, Array]:
  """Shared random texture fields (unit std) sized in mm so they look alike at any preset."""
  sp = np.asarray(spacing)
  return {
    'fine': mri.texture(shape, rng, tuple(0.45 / sp)),
    'coarse': mri.texture(shape, rng, tuple(2.5 / sp)),
    'striated': mri.texture(shape, rng, tuple(np.array([4.0, 0.5, 0.5]) / sp)),
    # Fat septa: zero crossings of a field stretched along the limb (array axis 0).
    'septa': mri.texture(shape, rng, tuple(np.array([9.0, 2.5, 2.5]) / sp)),
  }


def generate_knee(
  seed: int,
  preset: str = 'cpu',
  *,
  spacing_mm: float | None = None,
  fov_mm: float | None = None,
  visit: int | None = None,
  thinning: dict[str, float] | None = None,
  contrast: str = 'dess',
  shape_family: str = 'default',
  **anatomy_options: Any,
) -> scene.Phantom:
  """One sagittal DESS-like knee volume; identical output for identical arguments.

  spacing_mm, fov_mm (optional, mm): in-plane pixel spacing and field of view (array axes 0
  and 1, the sagittal plane) instead of the preset's; the in-plane shape becomes
  round(fov_mm / spacing_mm), the field of view stays centred on the same point of the knee,
  the in-plane PSF FWHM keeps the preset's FWHM / spacing ratio, and the slices (count,
  thickness) and the noise sigma stay the preset's. The anatomy and its pose do not depend on
  them; the texture, bias and noise realisations do. Without them the output is the preset's.

  anatomy_options (all optional): side 'right'|'left', scale (0.7-1.3), effusion_ml (>= 0),
  oa_thinning (0-1, weight-bearing cartilage loss), num_defects (focal cartilage defects),
  joint_gap_mm (>= 0, fluid gap between the cartilage surfaces), pose (False: no random pose).

  visit (optional, >= 0): a scan of this knee at that visit (docs/phantoms.md, "Follow-ups").
  Visit 0 is the baseline: the image and label map are exactly those without `visit`, and the
  sidecar gains the blocks 'visit' and 'subregion_thickness' (the analytic thickness of every
  femorotibial subregion). A visit >= 1 is the same knee (same seed, same anatomy options)
  rescanned: its repositioning (`draw_pose_change`), texture, bias field and noise are drawn
  from the seed sequence [seed, visit], and its cartilage is thinned by `thinning`
  ({region: mm}, names of knee_regions.THINNABLE, e.g. {'cMF': 0.1}; the change from the
  baseline, not from the previous visit). Without thinning a follow-up is a test-retest rescan.

  contrast: the tissue -> signal table (`contrast.CONTRASTS`): 'dess' (the default, every
  training set's) or a held-out one for judging ('iw_fs', 't1'); the same anatomy, texture,
  bias and noise draws, so only the signal changes. A held-out contrast is recorded in the
  sidecar ('contrast', and 'sequence' names it); with 'dess' the sidecar is unchanged.

  shape_family: 'default' (sample_anatomy's shapes), 'varied' (wider, for training) or
  'held_out' (outside the varied ranges, for judging); knee_shapes.py. The shape options
  (tibial_slope_deg, notch_half_width_mm, plateau_tilt_deg, condyle_scale, flexion_deg) set
  one parameter in any family. Either is recorded in the sidecar ('anatomy' 'shape'), else it
  is unchanged.
  """
  signal = contrast_lib.signal_table(contrast)
  shape = knee_shapes.draw_shape(seed, shape_family)
  p = mri.acquisition(PRESETS, preset, spacing_mm, fov_mm, 'generate_knee')
  ref = PRESETS[preset]
  thinning = knee_regions.check_thinning(thinning, 'generate_knee')
  if visit is not None and (isinstance(visit, bool) or int(visit) != visit or visit < 0):
    raise ValueError(f'generate_knee: visit={visit!r}; expected a whole number >= 0')
  if thinning and not visit:
    raise ValueError(
      f'generate_knee: thinning={thinning} needs a follow-up visit >= 1 (visit={visit!r}); '
      'visit 0 is the baseline'
    )
  rng = np.random.default_rng(seed)
  anatomy = sample_anatomy(rng, **anatomy_options)
  if shape is not None:
    knee_shapes.apply_shape(anatomy, shape, keep=set(anatomy_options))
  model = KneeModel(anatomy)
  pose_change = change_info = regions = None
  if visit is not None:
    grids = knee_regions.surface_grids(model)
    masks = knee_regions.region_masks(grids)
    model.thinning = knee_regions.thinning_zones(grids, masks, thinning, model.s) or None
    regions = (grids, masks)
  if visit:
    # The follow-up's own draws: the scan, never the knee.
    rng = np.random.default_rng([int(seed), int(visit)])
    pose_change, change_info = draw_pose_change(rng)
  grid = make_grid(anatomy, preset, spacing_mm, fov_mm, pose_change)
  sc = scene.Scene(grid, ramp_mm=float(np.mean(p['spacing'][:2])))
  sc.textures = make_textures(grid.shape, grid.spacing, rng)
  layers, pockets = build_layers(model, sc, signal)
  rendered = scene.render(sc, layers, background=0.0)
  image = mri.scanner_image(
    rendered.image, grid.spacing, p, ref, rng, bias_strength=0.1, coil_falloff=0.3
  )
  truth = knee_truth(model, grid, layers, rendered, pockets, seed, preset, p)
  if anatomy.shaped:
    truth['anatomy']['shape'] = knee_shapes.describe(anatomy)
  if contrast != 'dess':
    truth['sequence'] = contrast_lib.SEQUENCE_NAMES[contrast]
    truth['contrast'] = {'name': contrast, 'signal': dict(signal)}
  if visit is not None:
    truth['visit'] = {
      'visit': int(visit),
      'seed': int(seed),
      'scan_seed': [int(seed), int(visit)] if visit else int(seed),
      'pose_change': change_info,
      'thinning_mm': thinning,
      'thinning_meaning': 'mm taken off the cartilage over each named region of the '
      'subregion nomenclature (metrics.subregions) grown by a margin, never more than half the '
      'local thickness; the change from the baseline (visit 0); docs/phantoms.md "Follow-ups"',
    }
    truth['subregion_thickness'] = knee_regions.subregion_truth(model, *regions)
  return scene.Phantom(
    image=image, labels=rendered.labels, affine=grid.affine, reader_labels={}, truth=truth
  )


def knee_truth(
  model: KneeModel,
  grid: scene.Grid,
  layers,
  rendered: scene.Rendered,
  pockets: list[str],
  seed: int,
  preset: str,
  acquisition: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The sidecar: volumes, effusion, cartilage thickness fields and geometry.

  acquisition: `mri.acquisition`'s result for the grid (default: the preset's).
  """
  acq = acquisition or mri.acquisition(PRESETS, preset)
  from data_pipelines.phantoms import truth as truth_lib

  names = [layer.name for layer in layers]
  tissues = truth_lib.tissue_volumes(rendered, layers, grid, LABELS)
  effusion = truth_lib.effusion_pockets(rendered, names, pockets, grid)
  fem = model.femoral_grid()
  tib = model.tibial_grid()
  a = model.a
  return {
    'generator': 'data_pipelines.phantoms.knee',
    'generator_version': GENERATOR_VERSION,
    'kind': 'knee',
    'seed': int(seed),
    'preset': preset,
    'sequence': 'DESS-like',
    'plane': 'sagittal',
    **truth_lib.grid_entries(grid, acq, AXIS_CODES),
    'labels': LABELS,
    'tissues': tissues,
    'effusion': effusion,
    'anatomy': {
      'side': a.side,
      'scale': a.scale,
      'pose_deg': list(a.pose_deg),
      'pose_shift_mm': list(a.pose_shift_mm),
      'joint_gap_mm': a.joint_gap_mm,
      'oa_thinning': a.oa_thinning,
      'lateral_oa': a.lateral_oa,
      'defects': a.defects,
      'effusion_target_ml': a.effusion_ml,
    },
    'cartilage_thickness': {
      'femoral_cartilage': truth_lib.thickness_entry(
        fem,
        grid,
        ('theta_deg', 'x_mm'),
        'theta_deg: angle about the model mediolateral axis through (y, z) = '
        f'{list(np.round(model.axis_yz * model.s, 3))} mm, 0 = distal, positive = '
        'anterior; x_mm: model mediolateral coordinate, positive = lateral. Surface '
        'points: where the ray from the axis at angle theta leaves the femur.',
      ),
      'tibial_cartilage': truth_lib.thickness_entry(
        tib,
        grid,
        ('x_mm', 'y_mm'),
        'x_mm, y_mm: model mediolateral (positive lateral) and anteroposterior '
        '(positive anterior) coordinates; surface points: first hit of a vertical ray '
        'coming down onto the tibia.',
      ),
    },
  }
