"""The knee phantom's shape families (data_pipelines/phantoms/knee_shapes.py).

Truth: the ranges docs/phantoms.md states (typed here, not read from the module), the default
family's own output (which a family must leave alone), and geometry measured on the label
maps: a plateau tilted by t degrees raises its lateral side by tan(t) per mm of width against
the same knee untilted; and the analytic femur's free width across the notch.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_pipelines.phantoms import __main__ as cli
from data_pipelines.phantoms import knee, knee_anatomy, knee_shapes, writer

GRID = dict(spacing_mm=0.8, fov_mm=72.0)
# docs/phantoms.md, "Shape families": the varied (training) family's ranges.
VARIED = {
  'scale': (0.82, 1.18),
  'tibial_slope_deg': (0.0, 12.0),
  'joint_gap_mm': (0.15, 1.0),
  'notch_half_width_mm': (9.5, 11.5),
  'plateau_tilt_deg': (-3.0, 5.0),
}
CONDYLE = (0.88, 1.12)


def test_the_default_family_is_the_generators_knee():
  plain = knee.generate_knee(3, 'cpu', **GRID)
  named = knee.generate_knee(3, 'cpu', shape_family='default', **GRID)
  assert np.array_equal(plain.image, named.image) and np.array_equal(plain.labels, named.labels)
  assert plain.truth == named.truth and 'shape' not in plain.truth['anatomy']


def test_draws_lie_in_the_stated_ranges_and_held_out_ones_outside_them():
  varied = [knee_shapes.draw_shape(seed, 'varied') for seed in range(60)]
  held = [knee_shapes.draw_shape(seed, 'held_out') for seed in range(60)]
  for draw in varied:
    for name, (lo, hi) in VARIED.items():
      assert lo <= getattr(draw, name) <= hi
    assert all(CONDYLE[0] <= f <= CONDYLE[1] for t in draw.condyle_scale.values() for f in t)
  # Wider than the default family (scale 0.9-1.1, slope 3-10 degrees, gap 0.25-0.7 mm).
  assert min(d.scale for d in varied) < 0.87 and max(d.scale for d in varied) > 1.13
  assert (
    min(d.tibial_slope_deg for d in varied) < 2 and max(d.tibial_slope_deg for d in varied) > 11
  )
  for draw in held:
    for name, (lo, hi) in VARIED.items():
      value = getattr(draw, name)
      assert value < lo or value > hi, (name, value)
    assert all(not CONDYLE[0] <= f <= CONDYLE[1] for t in draw.condyle_scale.values() for f in t)
  for name in VARIED:  # both sides of each range are held out (wide notches only)
    values = [getattr(d, name) for d in held]
    assert max(values) > VARIED[name][1]
    assert min(values) < VARIED[name][0] or name == 'notch_half_width_mm'
  assert knee_shapes.draw_shape(7, 'varied') == varied[7]
  assert knee_shapes.draw_shape(7, 'default') is None


def test_a_family_changes_the_shape_and_keeps_the_rest_of_the_knee():
  """A varied knee records its draw in the sidecar; its effusion split, OA, defects, side and
  pose are the default knee's of the same seed; an explicit option wins over the draw."""
  base = knee.generate_knee(5, 'cpu', **GRID)
  ph = knee.generate_knee(5, 'cpu', shape_family='varied', **GRID)
  draw = knee_shapes.draw_shape(5, 'varied')
  shape = ph.truth['anatomy']['shape']
  assert shape['family'] == 'varied' and shape['notch_half_width_mm'] == draw.notch_half_width_mm
  assert shape['tibial_slope_deg'] == draw.tibial_slope_deg
  assert ph.truth['anatomy']['scale'] == draw.scale
  assert ph.truth['anatomy']['joint_gap_mm'] == draw.joint_gap_mm
  for key in ('side', 'pose_deg', 'pose_shift_mm', 'oa_thinning', 'defects', 'effusion_target_ml'):
    assert ph.truth['anatomy'][key] == base.truth['anatomy'][key]
  assert not np.array_equal(ph.labels, base.labels)
  fixed = knee.generate_knee(5, 'cpu', shape_family='held_out', tibial_slope_deg=5.0, **GRID)
  assert fixed.truth['anatomy']['shape']['tibial_slope_deg'] == 5.0
  assert fixed.truth['anatomy']['shape']['family'] == 'held_out'


def tibial_top_mm(labels, spacing):
  """Per (A-P column, slice) the height (mm, up) of the tibia's top voxel; NaN where none.
  Array axes: 0 superior -> inferior, 1 anterior -> posterior, 2 right -> left."""
  tibia = labels == 3
  first = np.argmax(tibia, axis=0).astype(float)
  first[~tibia.any(axis=0)] = np.nan
  return -first * spacing[0]


def test_plateau_tilt_raises_the_lateral_plateau_by_tan_t_per_mm():
  """The same right knee (no pose) with the plateau tilted 6 degrees varus against untilted:
  the tibia's top, differenced column by column over the plateau, rises laterally (to the
  right, slice index down) by tan(6 degrees) per mm, within 0.02."""
  opts = dict(side='right', pose=False, **GRID)
  flat = knee.generate_knee(2, 'cpu', plateau_tilt_deg=0.0, **opts)
  tilted = knee.generate_knee(2, 'cpu', plateau_tilt_deg=6.0, **opts)
  spacing = flat.truth['spacing_mm']
  diff = tibial_top_mm(tilted.labels, spacing) - tibial_top_mm(flat.labels, spacing)
  cols, slices = np.nonzero(np.isfinite(diff) & (np.abs(diff) < 10))
  # Lateral = patient right = lower slice index (axis 2 runs right -> left).
  lateral_mm = -(slices - slices.mean()) * spacing[2]
  central = np.abs(lateral_mm) < 30
  slope = np.polyfit(lateral_mm[central], diff[cols[central], slices[central]], 1)[0]
  assert slope == pytest.approx(math.tan(math.radians(6.0)), abs=0.02)


def test_the_notch_is_as_wide_as_its_parameter_where_it_carves_the_condyles():
  """Analytic shape: along the mediolateral line through the posterior condyles (base y -10,
  z 10 mm), the femur's free interval about the notch's centre is 2 x half-width x scale wide
  (within 0.6 mm, the smooth subtraction's blend) for half-widths 11.5 and 13 mm."""
  for half in (11.5, 13.0):
    anatomy = knee_anatomy.sample_anatomy(np.random.default_rng(4), notch_half_width_mm=half)
    model = knee_anatomy.KneeModel(anatomy)
    s = model.s
    x = np.arange(-30.0, 30.0, 0.02, dtype=np.float32) * s
    free = model.femur(x, np.full_like(x, -10.0 * s), np.full_like(x, 10.0 * s)) > 0
    centre = int(np.argmin(np.abs(x + s)))
    edges = np.flatnonzero(~free)
    left, right = edges[edges < centre].max(), edges[edges > centre].min()
    assert float(x[right] - x[left]) == pytest.approx(2 * half * s, abs=0.6)


@pytest.mark.slow
def test_options_and_families_are_checked_and_recorded_by_the_writer(tmp_path):
  with pytest.raises(ValueError, match='shape_family'):
    knee.generate_knee(0, 'cpu', shape_family='odd')
  with pytest.raises(ValueError, match='notch_half_width_mm'):
    knee.generate_knee(0, 'cpu', notch_half_width_mm=20.0)
  with pytest.raises(ValueError, match='condyle_scale'):
    knee.generate_knee(0, 'cpu', condyle_scale={'lateral': (1.0, 1.0)})
  meta = writer.write_dataset('knee', 1, 0, str(tmp_path / 'v'), shape_family='varied', **GRID)
  assert meta['shape_family'] == 'varied'
  truth = json.loads((tmp_path / 'v' / 'truth' / 'knee_0000.json').read_text())
  assert truth['anatomy']['shape']['family'] == 'varied'
  assert 'shape_family' not in writer.write_dataset('knee', 1, 0, str(tmp_path / 'd'), **GRID)
  with pytest.raises(ValueError, match='knees only'):
    writer.write_dataset('hip', 1, 0, str(tmp_path / 'h'), shape_family='varied')
  args = ['knee', '--out', str(tmp_path / 'c'), '--shape-family', 'held_out']
  assert cli.main([*args, '--spacing', '0.8', '--fov', '64']) == 0
  assert json.loads((tmp_path / 'c' / 'dataset.json').read_text())['shape_family'] == 'held_out'
