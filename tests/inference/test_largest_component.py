"""Largest-component post-processing: against a plain flood fill, on analytic shapes, through
predict_volume, and in config and resume checks."""

from __future__ import annotations

import collections
import itertools
import json
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import tissues
from imask_jax import configs, errors
from imask_jax import workdir as workdir_lib
from imask_jax.inference import loading, postprocess, whole_volume
from tests.conftest import box_painting_model, experiment_config


def _neighbours(bridged_slices: int) -> list[tuple[int, int, int]]:
  """The 26 neighbours, reaching bridged_slices + 1 slices along axis 0 (the bridge)."""
  reach = range(-bridged_slices - 1, bridged_slices + 2)
  return [d for d in itertools.product(reach, (-1, 0, 1), (-1, 0, 1)) if d != (0, 0, 0)]


def _reference(volume: np.ndarray, ids, bridged_slices: int = 0) -> np.ndarray:
  """Breadth-first flood fill written out voxel by voxel: two voxels of a class are linked
  when their slices differ by at most bridged_slices + 1 and their rows and columns by at
  most one each (plain 26-neighbours at 0)."""
  neighbours = _neighbours(bridged_slices)
  out = volume.copy()
  for class_id in ids:
    seen = np.zeros(volume.shape, bool)
    components = []
    for start in zip(*np.nonzero(volume == class_id)):
      if seen[start]:
        continue
      seen[start] = True
      members, queue = [start], collections.deque([start])
      while queue:
        voxel = queue.popleft()
        for step in neighbours:
          near = tuple(v + s for v, s in zip(voxel, step))
          inside = all(0 <= n < size for n, size in zip(near, volume.shape))
          if inside and not seen[near] and volume[near] == class_id:
            seen[near] = True
            members.append(near)
            queue.append(near)
      components.append(members)
    largest = max(range(len(components)), key=lambda i: len(components[i]), default=None)
    for i, members in enumerate(components):
      if i != largest:
        for voxel in members:
          out[voxel] = 0
  return out


@pytest.mark.parametrize('bridged_slices', [0, 1, 2])
@pytest.mark.parametrize('seed', range(6))
def test_matches_a_plain_flood_fill_on_random_volumes(seed, bridged_slices):
  rng = np.random.default_rng(seed)
  # Sparse random classes: many components of every size, diagonal contacts included; at
  # bridged_slices > 0 sparser, so that gaps between slices still separate some of them.
  density = 0.3 if bridged_slices == 0 else 0.06
  volume = np.where(rng.random((9, 9, 8)) < density, rng.integers(1, 4, (9, 9, 8)), 0)
  # The reference keeps the first largest component in scan order, as scipy's labels do.
  kept = postprocess.keep_largest_component(volume, (1, 3), bridged_slices=bridged_slices)
  np.testing.assert_array_equal(kept, _reference(volume, (1, 3), bridged_slices))
  if bridged_slices == 0:
    assert (kept != volume).any()  # the case is not trivial


@pytest.mark.parametrize('missed', [1, 2, 3])
def test_a_bone_missed_on_a_few_slices_stays_whole(missed):
  """A ball (a bone seen slice by slice) with `missed` empty slices through its middle: up to
  BRIDGED_SLICES of them it stays one bone; beyond, the smaller half goes. A blob within the
  bridge's reach of the ball's slices but elsewhere in the plane is dropped either way."""
  z, y, x = np.mgrid[:30, :40, :40]
  volume = np.zeros((30, 40, 40), np.int32)
  volume[(z - 14) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 <= 100] = 1  # radius 10, slices 4-24
  volume[16 : 16 + missed] = 0  # the larger half is slices 4-15
  volume[25:27, 33:37, 33:37] = 1  # one slice past the ball, 10+ pixels away in the plane
  kept = postprocess.keep_largest_component(volume, (1,))
  expected = volume.copy()
  expected[25:27] = 0
  if missed > postprocess.BRIDGED_SLICES:
    expected[16 + missed :] = 0
  np.testing.assert_array_equal(kept, expected)


def test_a_bone_keeps_its_largest_piece_and_other_classes_are_untouched():
  z, y, x = np.mgrid[:20, :40, :40]
  volume = np.zeros((20, 40, 40), np.int32)
  volume[(z - 10) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 36] = 1  # a ball of radius 6
  volume[2:4, 35:38, 35:38] = 1  # a stray blob far away
  volume[15:17, 30:32, 2:4] = 2  # class 2: two pieces, not post-processed
  volume[2:3, 30:32, 2:4] = 2
  # Touching the ball only at a corner still belongs to it (26-connectivity).
  volume[17, 13, 13] = 1
  assert volume[16, 12, 12] == 1
  assert volume[16:18, 12:14, 12:14].sum() == 2  # no face or edge contact
  kept = postprocess.keep_largest_component(volume, (1,), bridged_slices=0)
  expected = volume.copy()
  expected[2:4, 35:38, 35:38] = 0
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(volume[2:4, 35:38, 35:38], 1)  # the input is not modified


def test_names_not_among_the_classes_name_the_field():
  scheme = tissues.LabelScheme(tissues.HIP_CLASSES, (1,))
  with pytest.raises(ValueError, match=r"model.keep_largest_component=\('femur',\): \['femur'\]"):
    postprocess.class_ids(scheme, ('femur',), 'model.keep_largest_component')
  knee = tissues.LabelScheme(tissues.KNEE_CLASSES, (1, 2, 3, 4))
  assert postprocess.class_ids(knee, (tissues.TIBIA, tissues.FEMUR), 'f') == (3, 1)
  config = experiment_config('phantom_hip', 'smoke')
  config.model.keep_largest_component = ('tibia',)
  with pytest.raises(ValueError, match=r"\['tibia'\] not among the classes \('effusion',\)"):
    configs.check_train_config(config)


def _fake_model(config):
  """Paints a large and a small class-1 square in every slice."""
  return box_painting_model(config, [[2, 2, 22, 22], [40, 40, 46, 46]])


def test_predict_volume_applies_the_rule_of_the_config(tmp_path):
  config = experiment_config('phantom_knee', 'smoke')  # 1.6 mm network pixels
  image = np.random.default_rng(0).gamma(2.0, 100.0, (4, 64, 64)).astype(np.float32)
  path = os.path.join(tmp_path, 'scan.nii.gz')
  nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.6, 1.6, 1.0])), path)
  scan = loading.load_image(path, 'sagittal')
  femur = tissues.KNEE_PHANTOM_LABELS[tissues.FEMUR]

  config.model.keep_largest_component = ()
  both = whole_volume.predict_volume(_fake_model(config), scan).label_map == femur
  config.model.keep_largest_component = (tissues.FEMUR,)
  largest = whole_volume.predict_volume(_fake_model(config), scan).label_map == femur
  # Each slice paints a 20 x 20 and a 6 x 6 square; only the large one survives.
  assert both.sum() == 4 * (20 * 20 + 6 * 6)
  assert largest.sum() == 4 * 20 * 20
  assert not (largest & ~both).any()


def test_inference_only_settings_may_change_on_resume(tmp_path):
  config = experiment_config('phantom_knee', 'smoke')
  workdir_lib.save_config(config, str(tmp_path))
  os.makedirs(os.path.join(tmp_path, 'checkpoints'))
  changed = experiment_config('phantom_knee', 'smoke')
  changed.model.paint_rule = 'each'
  changed.model.keep_largest_component = ()
  changed.model.label_score_threshold = 0.3
  workdir_lib.check_resumable(changed, str(tmp_path))  # no error
  changed.model.fpn_dim += 8
  with pytest.raises(errors.SettingsChangedError, match=r'\(model.fpn_dim: 16 -> 24\)'):
    workdir_lib.check_resumable(changed, str(tmp_path))
  with open(os.path.join(tmp_path, 'config.json')) as f:
    assert json.load(f)['model']['keep_largest_component'] == ['femur', 'tibia']


def test_a_workdir_saved_before_these_fields_keeps_every_component_and_the_nearest_measure(
  tmp_path,
):
  config = experiment_config('phantom_knee', 'smoke')
  saved = json.loads(config.to_json())
  del saved['model']['keep_largest_component']
  del saved['eval']['thickness_method']
  with open(os.path.join(tmp_path, 'config.json'), 'w') as f:
    json.dump(saved, f)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.model.keep_largest_component == ()
  assert (loaded.eval.thickness_method, config.eval.thickness_method) == ('nearest', 'normal')
