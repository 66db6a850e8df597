"""The thickness measures' own bias: both methods of imask_jax.metrics.thickness
('nearest', the default, and 'normal', the surface-normal method) on shapes of known thickness
and on the knee phantom's truth label maps against its analytic thickness field.

    .venv/bin/python tools/thickness_bias.py                 # the tables of
                                                             # docs/results/thickness_measure.md
    .venv/bin/python tools/thickness_bias.py --cpu-seeds 2 --fine-seeds 0   # quicker

About 5 minutes on 2 busy cores (the fine phantoms take most). Prints markdown tables.

Analytic shapes: a voxel is cartilage when its centre lies in the continuous shape. Slabs
(bone below a plane, cartilage T = 2 mm above it) at generic orientations (irrational normal
ratios, so the voxelised slab holds T of cartilage on average), their means taken over the
points more than 5 mm from the array's faces; spherical shells (bone ball radius R, cartilage
to R + T) over all points. The offset is mean measured - T.

Phantoms: data_pipelines.phantoms.knee. 'cpu' is generate_knee(seed, 'cpu')'s own truth label
map (0.8 x 0.8 x 1.5 mm); 'fine' renders the same knee's femur, tibia and cartilage layers
(the highest-priority layers, so their labels are the generator's) on a grid of the 'full'
preset's voxels (0.3646 x 0.3646 x 0.7 mm) over the cpu preset's field of view, without the
image (the full preset's 384 x 384 x 160 image takes far longer and its labels differ only in
field of view). Each measured point (canonical RAS+ array mm) is mapped to the model frame and
KneeModel.shell gives the analytic thickness t at its foot point on the bone: the phantom's
cartilage is exactly t thick along the bone normal there. Offsets: per point (mean measured -
mean t over the method's points), over all points and over the interior (points more than 3
mm from the bone's bare surface, i.e. away from the plate's rim, where t tapers to 0 and a few
voxels cannot hold it), and per map (mean over the filled cells of the plate's map, what the
reports use, minus the mean over the same cells of a map of t at the same points).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
from scipy import spatial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import orientation  # noqa: E402
from data_pipelines.phantoms import knee, knee_anatomy, knee_layers, mri, scene  # noqa: E402
from imask_jax.metrics import thickness, thickness_maps  # noqa: E402

METHODS = thickness.THICKNESS_METHODS
FINE_SPACING = tuple(knee.PRESETS['full']['spacing'])  # (0.3646, 0.3646, 0.7) along I, P, L
SHAPE_SPACINGS = [(0.365, 0.365, 0.365), (0.365, 0.365, 0.7), (0.7, 0.365, 0.365), (1.5, 0.8, 0.8)]
SQRT2, SQRT3, SQRT5, SQRT7 = (math.sqrt(v) for v in (2, 3, 5, 7))
SLAB_NORMALS = {
  'slab, oblique to all axes': (1.0, SQRT2, SQRT3),
  'slab, 14 deg off z': (0.1 * SQRT2, 0.1 * SQRT3, 1.0),
  'slab, 18 deg off x': (1.0, 0.1 * SQRT5, 0.1 * SQRT7),
}
SHELLS = {'shell R 12, T 2 mm': (12.0, 2.0), 'shell R 20, T 1.5 mm': (20.0, 1.5)}
TILTS_DEG = (3, 6, 10, 14, 20, 30, 45)
RIM_MM = 3.0
PLATES = {'femoral': ('femur', 1, 2), 'tibial': ('tibia', 3, 4)}


# ----------------------------------------------------------------------------- shapes


def _coordinates(shape, spacing):
  grid = np.indices(shape, dtype=float)
  return [grid[i] * spacing[i] for i in range(3)]


def slab(thickness_mm, spacing, normal, size_mm=30.0):
  shape = tuple(int(size_mm / s) for s in spacing)
  x, y, z = _coordinates(shape, spacing)
  n = np.asarray(normal, float) / np.linalg.norm(normal)
  point = size_mm / 2 + np.array([0.13, 0.29, 0.41]) * np.asarray(spacing)
  distance = (x - point[0]) * n[0] + (y - point[1]) * n[1] + (z - point[2]) * n[2]
  labels = np.zeros(shape, np.uint8)
  labels[distance < 0] = 1
  labels[(distance >= 0) & (distance < thickness_mm)] = 2
  return labels


def shell(radius, thickness_mm, spacing):
  shape = tuple(int((2 * (radius + thickness_mm) + 6) / s) for s in spacing)
  x, y, z = _coordinates(shape, spacing)
  centre = [n * s / 2 + f * s for n, s, f in zip(shape, spacing, (0.13, 0.29, 0.41))]
  r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
  labels = np.zeros(shape, np.uint8)
  labels[r < radius] = 1
  labels[(r >= radius) & (r < radius + thickness_mm)] = 2
  return labels


def shape_offset(labels, spacing, method, margin_mm=None):
  """Mean thickness (mm) over the BCI points, those within margin_mm of the array's faces
  left out."""
  points = thickness.interface_thickness(labels, spacing, 1, 2, method=method)
  keep = np.ones(len(points.thickness_mm), bool)
  if margin_mm is not None:
    size = np.asarray(labels.shape) * np.asarray(spacing)
    keep = np.all(
      (points.positions_mm > margin_mm) & (points.positions_mm < size - margin_mm), axis=1
    )
  return float(points.thickness_mm[keep].mean())


def _cell(offset_mm, truth_mm):
  return f'{offset_mm:+.3f} ({100 * offset_mm / truth_mm:+.1f} %)'


def shape_table():
  header = ['shape', 'spacing (mm)'] + [f'{m} offset, mm (% of T)' for m in METHODS]
  rows = []
  for spacing in SHAPE_SPACINGS:
    for name, normal in SLAB_NORMALS.items():
      labels = slab(2.0, spacing, normal)
      rows.append(
        [name, str(spacing)]
        + [_cell(shape_offset(labels, spacing, m, margin_mm=5.0) - 2.0, 2.0) for m in METHODS]
      )
    for name, (radius, width) in SHELLS.items():
      labels = shell(radius, width, spacing)
      rows.append(
        [name, str(spacing)]
        + [_cell(shape_offset(labels, spacing, m) - width, width) for m in METHODS]
      )
  return header, rows


def tilt_table(spacing):
  """Slabs tilted by each angle from the z axis (azimuth 37 deg): the terraces of a surface
  nearly across a voxel axis."""
  header = ['tilt from z (deg)'] + [f'{m} offset, mm (% of T)' for m in METHODS]
  rows = []
  azimuth = math.radians(37.0)
  for tilt in TILTS_DEG:
    t = math.radians(tilt)
    normal = (math.sin(t) * math.cos(azimuth), math.sin(t) * math.sin(azimuth), math.cos(t))
    labels = slab(2.0, spacing, normal)
    rows.append(
      [str(tilt)]
      + [_cell(shape_offset(labels, spacing, m, margin_mm=5.0) - 2.0, 2.0) for m in METHODS]
    )
  return header, rows


# ----------------------------------------------------------------------------- phantoms


class Knee:
  """A phantom knee's truth label map in canonical RAS+, and its analytic thickness."""

  def __init__(self, seed, grid_kind):
    self.seed = seed
    anatomy = knee_anatomy.sample_anatomy(np.random.default_rng(seed))  # generate_knee's first draw
    self.model = knee_anatomy.KneeModel(anatomy)
    if grid_kind == 'cpu':
      phantom = knee.generate_knee(seed, 'cpu')
      labels, affine = phantom.labels, phantom.affine
      model_to_world = np.asarray(phantom.truth['model_to_world'])
      self.sidecar = {
        plate: phantom.truth['cartilage_thickness'][f'{plate}_cartilage']['mean_thickness_mm']
        for plate in PLATES
      }
    else:
      labels, affine, model_to_world = self._render_fine(anatomy)
      self.sidecar = None
    source = orientation.SourceGrid.from_affine(labels.shape, affine)
    self.labels = source.to_canonical(labels)
    self.spacing = np.asarray(source.canonical_spacing)
    self._canonical_affine = source.canonical_affine
    self._world_to_model = np.linalg.inv(model_to_world)

  def _render_fine(self, anatomy):
    cpu = knee.PRESETS['cpu']
    shape = tuple(
      int(round(n * s / f)) for n, s, f in zip(cpu['shape'], cpu['spacing'], FINE_SPACING)
    )
    placed = knee.make_grid(anatomy, 'cpu')  # the knee's pose in the world
    affine = mri.grid_affine(shape, FINE_SPACING, knee.AXIS_DIRECTIONS, np.zeros(3))
    grid = scene.Grid(shape, affine, placed.model_to_world)
    sc = scene.Scene(grid, ramp_mm=float(np.mean(FINE_SPACING[:2])))
    # Textures only shade the image; the labels do not depend on them.
    sc.textures = {k: np.zeros(shape, np.float32) for k in ('fine', 'coarse', 'striated', 'septa')}
    layers, _ = knee_layers.build_layers(self.model, sc)
    last = max(i for i, layer in enumerate(layers) if layer.label in (1, 2, 3, 4))
    return scene.render(sc, layers[: last + 1]).labels, affine, placed.model_to_world

  def analytic(self, bone_name, positions_mm):
    """Analytic thickness (mm) at the foot points of positions [N, 3] (canonical array mm)."""
    index = positions_mm / self.spacing
    world = index @ self._canonical_affine[:3, :3].T + self._canonical_affine[:3, 3]
    model = world @ self._world_to_model[:3, :3].T + self._world_to_model[:3, 3]
    _, t = self.model.shell(bone_name, *model.T.astype(np.float32))
    return t.astype(float)

  def bare_bone(self, bone, cartilage):
    """Centres (array mm) of the faces between the bone and neither bone nor cartilage."""
    relabelled = np.zeros(self.labels.shape, np.uint8)
    relabelled[self.labels == bone] = 2
    relabelled[self.labels == cartilage] = 1
    # interface faces of 'cartilage' 2 with 'bone' 1 are bone-cartilage; articular ones of 2
    # are the bone's faces with anything else.
    _, bare = thickness._interface_faces(relabelled, self.spacing, 1, 2)
    return bare


def plate_offsets(k, plate, method):
  """Offsets of one plate: per point (all, interior) and per map cell, in mm and % of t."""
  bone_name, bone, cartilage = PLATES[plate]
  points = thickness.interface_thickness(k.labels, k.spacing, bone, cartilage, method=method)
  t = k.analytic(bone_name, points.positions_mm)
  rim = spatial.cKDTree(k.bare_bone(bone, cartilage)).query(points.positions_mm)[0]
  interior = rim > RIM_MM
  measured_map, truth_map = _maps(k, plate, points, t)
  return {
    'truth_mm': t.mean(),
    'all': points.thickness_mm.mean() - t.mean(),
    'interior_truth_mm': t[interior].mean(),
    'interior': points.thickness_mm[interior].mean() - t[interior].mean(),
    'map_truth_mm': truth_map.mean_thickness_mm,
    'map': measured_map.mean_thickness_mm - truth_map.mean_thickness_mm,
    'points': len(t),
    'interior_points': int(interior.sum()),
  }


def _maps(k, plate, points, t):
  """The plate's map of the measured thickness and one of t at the same points and cells,
  with evaluate's bins."""
  analytic = thickness.InterfaceThickness(points.positions_mm, t)
  where = 'tools/thickness_bias.py'
  if plate == 'femoral':
    cylinder = thickness_maps.fit_cylinder(points.positions_mm)
    axial_bin = thickness_maps._default_bin_mm(k.spacing, axes=(0,), where=where)
    angle_bin = thickness_maps.femoral_angle_bin_deg(k.spacing)
    axial_range = thickness_maps._extent(
      thickness_maps.cylinder_coordinates(points.positions_mm, cylinder)[1]
    )
    return [
      thickness_maps._femoral_map(p, cylinder, angle_bin, axial_bin, axial_range, where)
      for p in (points, analytic)
    ]
  bin_mm = thickness_maps._default_bin_mm(k.spacing, axes=(0, 1), where=where)
  return [thickness_maps._tibial_map(p, bin_mm, None, None, where) for p in (points, analytic)]


def phantom_table(grid_kind, seeds):
  header = [
    'grid',
    'plate',
    'method',
    'truth t, mm',
    'offset, all points',
    'offset, interior (> 3 mm from rim)',
    'offset, map cells',
  ]
  results = {}
  for seed in seeds:
    start = time.time()
    k = Knee(seed, grid_kind)
    for plate in PLATES:
      for method in METHODS:
        results.setdefault((plate, method), []).append(plate_offsets(k, plate, method))
    print(
      f'  {grid_kind} seed {seed}: spacing {[round(float(s), 4) for s in k.spacing]} mm, '
      f'{time.time() - start:.0f} s',
      file=sys.stderr,
      flush=True,
    )
  rows = []
  for (plate, method), values in results.items():
    truth = np.mean([v['truth_mm'] for v in values])
    cells = []
    for key, reference in (
      ('all', 'truth_mm'),
      ('interior', 'interior_truth_mm'),
      ('map', 'map_truth_mm'),
    ):
      offsets = np.array([v[key] for v in values])
      percent = np.array([100 * v[key] / v[reference] for v in values])
      cells.append(
        f'{offsets.mean():+.3f} mm ({percent.mean():+.1f} %; '
        f'{percent.min():+.1f} to {percent.max():+.1f})'
      )
    rows.append([grid_kind, plate, method, f'{truth:.2f}'] + cells)
  return header, rows


def markdown(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cpu-seeds', type=int, default=5, help='phantoms at the cpu preset')
  parser.add_argument(
    '--fine-seeds', type=int, default=3, help='phantoms at the full preset spacing'
  )
  parser.add_argument('--no-shapes', action='store_true', help='skip the analytic shapes')
  args = parser.parse_args(argv)
  start = time.time()
  if not args.no_shapes:
    print('## Analytic shapes\n')
    print(markdown(*shape_table()) + '\n')
    for spacing in ((0.365, 0.365, 0.7), (0.365, 0.365, 0.365)):
      print(f'## Slabs tilted from the z axis, {spacing} mm\n')
      print(markdown(*tilt_table(spacing)) + '\n')
  rows, header = [], None
  for grid_kind, count in (('cpu', args.cpu_seeds), ('fine', args.fine_seeds)):
    if count:
      header, part = phantom_table(grid_kind, range(count))
      rows += part
  if rows:
    print(
      f'## Phantom truth label maps ({args.cpu_seeds} cpu, {args.fine_seeds} fine volumes, '
      'seeds from 0)\n'
    )
    print(
      'Offsets: mean over volumes of (measured - analytic), in mm and % of the analytic '
      'mean (mean; min to max over volumes).\n'
    )
    print(markdown(header, rows) + '\n')
  print(f'({time.time() - start:.0f} s)', file=sys.stderr)


if __name__ == '__main__':
  main()
