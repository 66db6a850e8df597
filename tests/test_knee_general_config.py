"""experiments/knee_general.py: its config and variants build a valid training config with
contrast randomisation on (off in the ablation), reading the varied-family folder, and round-trip
through a workdir's config.json."""

from __future__ import annotations

import pytest

from conftest import experiment_config
from imask_jax import configs
from imask_jax import contrast_augment as ca
from imask_jax import input_pipeline as ip
from imask_jax import workdir as workdir_lib
from imask_jax.models.mask_rcnn import ModelSpec


@pytest.mark.parametrize('arg', [None, 'smoke', 'contrast=False,steps=7,seed=2', 'data=/x/y'])
def test_config_builds_checks_and_round_trips(arg, tmp_path):
  config = experiment_config('knee_general', arg)
  configs.check_train_config(config)
  spec = ModelSpec.from_config(config)
  assert spec.num_classes == len(config.data.class_names) == 4
  workdir_lib.save_config(config, str(tmp_path))
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  settings = ip.augment_settings(loaded).contrast
  if arg and 'contrast=False' in arg:
    assert settings is None and config.train.steps == 7 and config.seed == 2
  else:
    assert isinstance(settings, ca.ContrastSettings) and settings.rate == 0.8


def test_defaults_read_the_varied_folder_and_smoke_runs_on_phantoms():
  config = experiment_config('knee_general')
  assert (config.data.dataset, config.data.manual_dir) == (
    'nifti_folder',
    'data/knee_general/varied',
  )
  assert tuple(config.data.class_label_values) == (1, 2, 3, 4)
  assert experiment_config('knee_general', 'data=/x/y').data.manual_dir == '/x/y'
  smoke = experiment_config('knee_general', 'smoke')
  assert smoke.data.dataset == 'phantom_knee' and smoke.train.steps <= 10
  assert max(smoke.data.image_size) <= 64 and smoke.data.augment.contrast.enabled
  with pytest.raises(ValueError, match='unknown config arguments'):
    experiment_config('knee_general', 'colour=blue')
