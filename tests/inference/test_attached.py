"""postprocess.keep_attached (cartilage components far from their bone are dropped) against a
brute-force NumPy reference and placed blobs, its config checks, and the rule inside
predict_volume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import tissues
from data_pipelines.tissues import LabelScheme
from imask_jax import configs
from imask_jax.inference import postprocess, whole_volume
from tests.conftest import box_painting_model, experiment_config, noise_scan

BONE, CARTILAGE, OTHER = 1, 2, 3


def _reference(volume, cartilage_id, bone_id, spacing, radius_mm):
  """Brute force: every cartilage component's smallest distance between its voxel centres and
  the bone's, over all pairs; components beyond the radius set to 0."""
  out = volume.copy()
  bone = np.argwhere(volume == bone_id) * np.asarray(spacing)
  if len(bone) == 0:
    return out
  components, count = ndimage.label(volume == cartilage_id, structure=np.ones((3, 3, 3)))
  for i in range(1, count + 1):
    points = np.argwhere(components == i) * np.asarray(spacing)
    nearest = np.sqrt(((points[:, None] - bone[None]) ** 2).sum(-1)).min()
    if nearest > radius_mm:
      out[components == i] = 0
  return out


def test_specks_far_from_the_bone_go_and_the_plate_stays():
  spacing = (1.0, 0.5, 2.0)
  vol = np.zeros((20, 30, 12), np.int32)
  vol[2:18, 2:12, 2:10] = BONE
  vol[2:18, 12:14, 2:10] = CARTILAGE  # the plate on the bone's face
  vol[9, 20, 5] = CARTILAGE  # 8 voxels of 0.5 mm beyond the bone's last row: 4.5 mm, kept
  vol[9, 26, 5] = CARTILAGE  # 7.5 mm: dropped
  vol[9, 5, 11] = CARTILAGE  # one Z voxel past the bone's last (2 mm per voxel): kept
  vol[19, 25, 0] = OTHER  # another class far from everything: untouched
  got = postprocess.keep_attached(vol, [(CARTILAGE, BONE)], spacing, 5.0)
  np.testing.assert_array_equal(got, _reference(vol, CARTILAGE, BONE, spacing, 5.0))
  expected = vol.copy()
  expected[9, 26, 5] = 0
  np.testing.assert_array_equal(got, expected)
  # The same voxels on an isotropic 1 mm grid: the first speck is 9 mm away and goes too.
  iso = postprocess.keep_attached(vol, [(CARTILAGE, BONE)], (1.0, 1.0, 1.0), 5.0)
  assert iso[9, 20, 5] == 0 and iso[9, 5, 11] == CARTILAGE
  # Without the bone there is nothing to judge by: everything stays.
  no_bone = np.where(vol == BONE, 0, vol)
  np.testing.assert_array_equal(
    postprocess.keep_attached(no_bone, [(CARTILAGE, BONE)], spacing, 5.0), no_bone
  )


@pytest.mark.parametrize('seed', range(4))
def test_random_blobs_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  shape = (16, 13, 9)
  field = ndimage.gaussian_filter(rng.random(shape), 1.0)
  vol = np.where(field > 0.56, CARTILAGE, 0).astype(np.int32)
  vol[field < 0.44] = BONE
  spacing = tuple(rng.uniform(0.4, 2.0, 3))
  for radius in (0.0, 1.5, 4.0):
    got = postprocess.keep_attached(vol, [(CARTILAGE, BONE)], spacing, radius)
    np.testing.assert_array_equal(got, _reference(vol, CARTILAGE, BONE, spacing, radius))


def test_config_pairs_each_cartilage_with_its_bone_and_names_bad_fields():
  config = configs.default_config()
  scheme = LabelScheme.from_config(config)
  config.model.keep_attached = (tissues.TIBIAL_CARTILAGE, tissues.FEMORAL_CARTILAGE)
  rule = postprocess.attach_rule(scheme, config.model)
  assert rule == postprocess.AttachRule(((4, 3), (2, 1)), 5.0)
  parts = LabelScheme.from_values(
    (tissues.FEMUR, tissues.TIBIA, tissues.MEDIAL_TIBIAL_CARTILAGE), (1, 3, 4)
  )
  config.model.keep_attached = (tissues.MEDIAL_TIBIAL_CARTILAGE,)
  assert postprocess.attach_rule(parts, config.model).pairs == ((3, 2),)
  for names, message in (
    ((tissues.FEMUR,), "'femur' is not a cartilage"),
    (('meniscus',), 'not among the classes'),
  ):
    config.model.keep_attached = names
    with pytest.raises(ValueError, match=message):
      configs.check_train_config(config)
  config.data.class_names = (tissues.FEMORAL_CARTILAGE,)
  config.data.class_label_values = (2,)
  config.model.keep_attached = (tissues.FEMORAL_CARTILAGE,)
  with pytest.raises(ValueError, match='lies on the femur, which is not among the classes'):
    postprocess.attach_rule(LabelScheme.from_config(config), config.model)
  config = configs.default_config()
  config.model.attach_radius_mm = float('nan')
  with pytest.raises(ValueError, match='model.attach_radius_mm'):
    configs.check_train_config(config)


def test_knee_experiments_drop_cartilage_away_from_bone():
  variants = (('phantom_knee', None), ('knee_general', None), ('oai', 'oaizib_cm,tibial_parts'))
  for name, arg in variants:
    config = experiment_config(name, arg)
    cartilage = [n for n in config.data.class_names if n not in (tissues.FEMUR, tissues.TIBIA)]
    assert tuple(config.model.keep_attached) == tuple(cartilage), name
  assert experiment_config('oai', 'paper').model.keep_attached == ()


@pytest.mark.slow
def test_predict_volume_drops_the_far_speck(tmp_path):
  config = experiment_config('phantom_knee', 'smoke')
  mm = float(config.data.pixel_spacing_mm)
  scan = noise_scan(tmp_path, 'sagittal', mm)  # 64 x 64 network pixels a slice
  config.model.attach_radius_mm = 5 * mm
  boxes = [
    [4, 4, 24, 40],  # the femur
    [24, 4, 28, 40],  # its cartilage, touching it
    [44, 44, 48, 48],  # a speck of cartilage 20 pixels away
  ]
  classes = [1, 2, 2]

  def painted(names):
    config.model.keep_attached = names
    model = box_painting_model(config, boxes, classes)
    return whole_volume.predict_volume(model, scan).label_map

  everything, attached = painted(()), painted((tissues.FEMORAL_CARTILAGE,))
  assert (everything == 2).sum() == 4 * (4 * 36 + 16)
  assert (attached == 2).sum() == 4 * 4 * 36
  np.testing.assert_array_equal(attached == 1, everything == 1)
  assert not ((attached == 2) & ~(everything == 2)).any()
