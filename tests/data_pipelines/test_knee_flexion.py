"""Knee flexion as a shape parameter of the knee phantom (knee_shapes.py 'flexion_deg').

Truth: the ranges docs/phantoms.md states (typed here, not read from the module); the extended
knee's own output (flexion 0 must leave it bit for bit); and geometry measured on the label
maps of the same right knee without pose, flexed and extended: a rigid turn about the
condyles' centre keeps the femur's labels, turns the tibia's shaft by the angle (posteriorly),
keeps volumes, and keeps the tibial cartilage against the femoral cartilage.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines.phantoms import knee, knee_anatomy, knee_layers, knee_shapes, scene

SEED = 2
# A 140 mm in-plane field of view: the femur, the joint and 5 cm of tibial shaft.
GRID = dict(spacing_mm=0.8, fov_mm=140.0)
OPTS = dict(side='right', pose=False, **GRID)
# docs/phantoms.md, "Shape families": flexion (degrees) per family, and the option's limits.
VARIED = (0.0, 20.0)
HELD_OUT = (25.0, 35.0)
LIMITS = (0.0, 40.0)
FLEXION = 20.0


@pytest.fixture(scope='module')
def knees():
  """The same right knee (no pose) extended (flexion 0, and no option) and flexed 20 degrees."""
  return {
    'plain': knee.generate_knee(SEED, 'cpu', **OPTS),
    0.0: knee.generate_knee(SEED, 'cpu', flexion_deg=0.0, **OPTS),
    FLEXION: knee.generate_knee(SEED, 'cpu', flexion_deg=FLEXION, **OPTS),
  }


def pivot_world(flexion: float) -> np.ndarray:
  """The flexion axis's point (world mm, RAS): the mean of the two condyle ellipsoids' centres
  after the joint fit (base mm x scale; x = 0), through the knee's model -> world pose."""
  anatomy = knee_anatomy.sample_anatomy(
    np.random.default_rng(SEED), side='right', pose=False, flexion_deg=flexion
  )
  model = knee_anatomy.KneeModel(anatomy)
  lat, med = model.cond['lateral']['c'], model.cond['medial']['c']
  p = np.array([0.0, 0.5 * (lat[1] + med[1]), 0.5 * (lat[2] + med[2])]) * model.s
  to_world = knee.make_grid(anatomy, 'cpu', **GRID).model_to_world
  return to_world[:3, :3] @ p + to_world[:3, 3]


def world_points(phantom, mask: np.ndarray) -> np.ndarray:
  """World (RAS, mm) centres [N, 3] of the voxels in `mask`."""
  idx = np.argwhere(mask).astype(np.float64)
  return idx @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]


def shaft_direction(phantom, pivot: np.ndarray) -> np.ndarray:
  """Unit (A, S) direction from the flexion axis's point to the centroid of the tibia label's
  voxels 45-80 mm from it (the upper shaft, below the metaphysis). A shell about the turn's
  centre is carried onto itself by the turn, so its tibia voxels turn as a whole, whatever
  the field of view (the shell's bottom, 80 mm from the point, lies inside it)."""
  pts = world_points(phantom, phantom.labels == 3)
  r = np.linalg.norm(pts - pivot, axis=1)
  arm = pts[(r > 45.0) & (r < 80.0)].mean(0)[1:] - pivot[1:]
  return arm / np.linalg.norm(arm)


def test_the_option_is_checked_with_one_line_naming_it():
  for bad in (-1.0, 41.0, float('nan'), float('inf')):
    with pytest.raises(ValueError, match=r'flexion_deg=') as err:
      knee_anatomy.sample_anatomy(np.random.default_rng(0), flexion_deg=bad)
    assert '\n' not in str(err.value) and str(LIMITS[1]) in str(err.value)
  assert knee_shapes.check_option('flexion_deg', 12) == 12.0


def test_flexion_zero_is_the_extended_knee_bit_for_bit(knees):
  plain, zero = knees['plain'], knees[0.0]
  for key in ('image', 'labels', 'affine'):
    assert np.array_equal(getattr(plain, key), getattr(zero, key))
  assert zero.truth['anatomy']['shape']['flexion_deg'] == 0.0
  model = knee_anatomy.KneeModel(knee_anatomy.sample_anatomy(np.random.default_rng(SEED)))
  assert model.flex is None


def test_the_tibial_shaft_turns_by_the_angle_posteriorly(knees):
  """The shaft's direction from the flexion axis (A, S) turns by 20 degrees within 0.5, its
  inferior end swinging posteriorly (towards -A): knee flexion, not hyperextension."""
  straight = shaft_direction(knees[0.0], pivot_world(0.0))
  bent = shaft_direction(knees[FLEXION], pivot_world(FLEXION))
  assert straight[1] < -0.95  # extended: the shaft points down
  turn = math.degrees(math.atan2(straight[0] * bent[1] - straight[1] * bent[0], straight @ bent))
  # In the (A, S) plane, A to the right and S up, a shaft pointing down that swings
  # posteriorly (to -A) turns clockwise: a negative angle.
  assert turn == pytest.approx(-FLEXION, abs=0.5)
  assert bent[0] < straight[0] - 0.25  # posterior: its A component falls by about sin 20


def test_the_femur_stays_and_the_volumes_are_kept(knees):
  """Femur and femoral cartilage labels are the extended knee's voxel for voxel; the
  tibial cartilage's volume and the tibia's within 45 mm of the flexion axis's point (a ball
  the turn maps onto itself, all inside the field of view) within 3 %."""
  ext, flex = knees[0.0], knees[FLEXION]
  for label in (1, 2):
    assert np.array_equal(ext.labels == label, flex.labels == label), label
  assert np.sum(flex.labels == 4) == pytest.approx(np.sum(ext.labels == 4), rel=0.03)

  def tibia_in_ball(phantom, pivot):
    pts = world_points(phantom, phantom.labels == 3)
    return np.sum(np.linalg.norm(pts - pivot, axis=1) < 45.0)

  near_ext = tibia_in_ball(ext, pivot_world(0.0))
  assert tibia_in_ball(flex, pivot_world(FLEXION)) == pytest.approx(near_ext, rel=0.03)
  assert not np.array_equal(ext.labels == 3, flex.labels == 3)


def test_the_tibial_cartilage_stays_against_the_femoral_cartilage(knees):
  """The closest tibial cartilage voxel to the femoral cartilage is within a voxel of the
  extended knee's distance (the tibia neither lifts off the condyles nor sinks into them,
  which would hide its cartilage under the femur's)."""

  def closest_mm(phantom):
    spacing = phantom.truth['spacing_mm']
    dist = ndimage.distance_transform_edt(phantom.labels != 2, sampling=spacing)
    return float(dist[phantom.labels == 4].min())

  assert closest_mm(knees[FLEXION]) == pytest.approx(closest_mm(knees[0.0]), abs=0.8)
  assert closest_mm(knees[FLEXION]) < 2.0


# The fields of the render layers that move with the tibia, and some that stay with the femur.
MOVED = (
  'tibia',
  'fibula',
  'medial_meniscus',
  'lateral_meniscus',
  'soleus',
  'tibialis_anterior',
  'popliteus',
)
STAYING = ('femur', 'patella', 'acl', 'gastrocnemius_medial')


def layer_fields(flexion: float):
  """(model, {field name: (SDF of model-frame mm, box)}) of the render layers of the test knee."""
  anatomy = knee_anatomy.sample_anatomy(
    np.random.default_rng(SEED), side='right', pose=False, flexion_deg=flexion
  )
  model = knee_anatomy.KneeModel(anatomy)
  sc = scene.Scene(knee.make_grid(anatomy, 'cpu', **GRID), ramp_mm=0.8)
  sc.textures = {}
  knee_layers.build_layers(model, sc)
  return model, sc._fields


def test_what_is_attached_to_the_tibia_moves_with_it_rigidly():
  """At points q of each moved field's extended box, the flexed field at the moved point
  R q + o equals the extended field at q (a rigid companion of the tibia; within 1e-3 mm)
  and lies in the flexed field's box; the femur's, patella's, ACL's and gastrocnemius's
  fields are the extended ones at the same points."""
  _, ext = layer_fields(0.0)
  model, flex = layer_fields(FLEXION)
  rng = np.random.default_rng(0)
  for name in MOVED + STAYING:
    lo, hi = (np.asarray(b, np.float64) for b in ext[name][1])
    q = rng.uniform(lo, hi, (400, 3))
    p = np.stack(model.from_tibia(*q.T), 1) if name in MOVED else q
    want = ext[name][0](*q.T.astype(np.float32))
    got = flex[name][0](*p.T.astype(np.float32))
    np.testing.assert_allclose(got, want, atol=1e-3, err_msg=name)
    flo, fhi = (np.asarray(b) for b in flex[name][1])
    assert np.all((p >= flo - 1e-6) & (p <= fhi + 1e-6)), name


def cartilage_clearance(seed: int, flexion: float) -> float:
  """Analytic: the least distance (mm) from the tibial cartilage's upper surface (the tibial
  grid's points moved out along their normals by the thickness, model frame) to the femoral
  cartilage's surface, over the femur's articular cover."""
  anatomy = knee_anatomy.sample_anatomy(np.random.default_rng(seed), flexion_deg=flexion)
  model = knee_anatomy.KneeModel(anatomy)
  grid = model.tibial_grid(1.0)
  pts, normals = grid['points'].reshape(-1, 3), grid['normals'].reshape(-1, 3)
  thick = grid['thickness'].ravel()
  covered = thick > 0.5
  top = (pts[covered] + normals[covered] * thick[covered, None]).astype(np.float32)
  d, t = model.shell('femur', *top.T)
  return float(np.min((d - t)[t > 0]))


@pytest.mark.parametrize('seed', [0, 2])
def test_flexion_keeps_the_joint_gap_between_the_cartilages(seed):
  """The flexed cartilages clear each other as the extended ones do (within 0.15 mm) and do
  not overlap: the tibia rolls on the condyles. A turn about the condyles' centre alone,
  without the slide along the shaft, overlaps them by 0.1-3.5 mm at 20-35 degrees."""
  extended = cartilage_clearance(seed, 0.0)
  for flexion in (FLEXION, HELD_OUT[1]):
    bent = cartilage_clearance(seed, flexion)
    assert bent > 0 and bent == pytest.approx(extended, abs=0.15), flexion


def test_families_draw_flexion_in_their_documented_ranges():
  varied = [knee_shapes.draw_shape(seed, 'varied').flexion_deg for seed in range(60)]
  held = [knee_shapes.draw_shape(seed, 'held_out').flexion_deg for seed in range(60)]
  assert all(VARIED[0] <= f <= VARIED[1] for f in varied)
  assert min(varied) < 3.0 and max(varied) > 17.0  # spread over the range
  assert all(HELD_OUT[0] <= f <= HELD_OUT[1] for f in held)
  assert knee_anatomy.KneeAnatomy.__dataclass_fields__['flexion_deg'].default == 0.0


def test_flexion_is_drawn_last_so_the_other_draws_are_kept():
  """The other shape parameters of a seed are those drawn before flexion was a parameter: the
  same stream with flexion's draw dropped (typed here: the varied family's draw order)."""
  rng = np.random.default_rng([5, knee_shapes.SHAPE_STREAM])
  names = ['scale', 'tibial_slope_deg', 'joint_gap_mm', 'notch_half_width_mm']
  expected = {name: float(rng.uniform(*knee_shapes.VARIED[name])) for name in names}
  factors = [float(rng.uniform(0.88, 1.12)) for _ in range(6)]
  expected['plateau_tilt_deg'] = float(rng.uniform(-3.0, 5.0))
  draw = knee_shapes.draw_shape(5, 'varied')
  for name, value in expected.items():
    assert getattr(draw, name) == value, name
  assert draw.condyle_scale == {'lateral': tuple(factors[:3]), 'medial': tuple(factors[3:])}
  assert draw.flexion_deg == float(rng.uniform(*VARIED))
