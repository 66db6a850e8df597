"""The strict paper variants (`oai.py:paper`, `stiho.py:paper`) and the two meanings of an epoch.

* What an epoch is: with train.steps_per_epoch = N an epoch is N steps whatever the dataset
  (Matterport's convention), with 0 one pass over the training slices.
* The paper variants differ from the recommended settings in exactly the fields
  docs/reproducing.md lists as the recommended settings' differences, each of them named
  there; every augmentation is the identity, and nothing the paper does not name is on.
"""

from __future__ import annotations

import math
import os

import pytest

from imask_jax import configs, paper
from tests.conftest import REPO, experiment_config

# The fields the strict variants change, per experiment (docs/reproducing.md names each).
STRICT_CHANGES = {
  'data.augment.gamma_range',
  'data.augment.noise_std',
  'data.augment.rotate_degrees',
  'data.augment.scale_range',
  'data.empty_slice_rate',
  'data.pixel_spacing_mm',
  'data.split_fractions',
  'model.anchor_ratios',
  'model.imask.fine_dim',
  'model.imask.fuse_convs',
  'model.imask.reduce',
  'model.imask.skip_projection',
  'model.label_score_threshold',
  'model.paint_rule',
  'train.batch_size',
  'train.grad_clip_norm',
  'train.steps',
  'train.steps_per_epoch',
  'train.warmup_steps',
}
OWN_CHANGES = {
  'oai': {
    'model.keep_attached',
    'model.keep_largest_component',
    'model.mask_dice_weight',
    'model.paint_slots_per_class',
  },
  'stiho': {
    'data.augment.flip_lr',
    'model.keep_largest_cluster',
    'model.roi_hard_negative_fraction',
  },
}


def flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


def test_an_epoch_is_a_pass_or_a_fixed_number_of_steps():
  c = configs.default_config()
  c.train.epochs, c.train.batch_size = 300.0, 8
  assert configs.resolve_steps(c, 75_200) == 2_820_000  # 300 x 75,200 / 8
  assert configs.resolve_steps(c, 75_201) == 2_820_038  # rounded up
  c.train.steps_per_epoch = 1000
  assert configs.resolve_steps(c, 75_200) == configs.resolve_steps(c, 3) == 300_000
  c.train.epochs = 2.5
  assert configs.resolve_steps(c, 10) == 2500
  c.train.epochs = 0.0  # steps alone: the epoch settings are not read
  c.train.steps = 17
  assert configs.resolve_steps(c, 10) == 17


@pytest.mark.parametrize('value', (-1, -1000))
def test_a_bad_steps_per_epoch_names_the_field(value):
  c = experiment_config('phantom_knee', 'smoke')
  c.train.steps_per_epoch = value
  with pytest.raises(ValueError, match=r'config train\.steps_per_epoch=.*expected an integer >= 0'):
    configs.check_train_config(c)


@pytest.mark.parametrize('name', ('oai', 'stiho'))
def test_the_strict_variant_changes_only_the_documented_fields(name):
  recommended = flat(experiment_config(name).to_dict())
  strict = flat(experiment_config(name, 'paper').to_dict())
  changed = {key for key in recommended if recommended[key] != strict[key]}
  assert changed == STRICT_CHANGES | OWN_CHANGES[name]
  with open(os.path.join(REPO, 'docs', 'reproducing.md'), encoding='utf-8') as f:
    text = f.read()
  undocumented = sorted(key for key in changed if f'`{key}`' not in text)
  assert not undocumented, f'docs/reproducing.md does not name {undocumented}'


@pytest.mark.parametrize('name, train, test', (('oai', 470, 30), ('stiho', 125, 50)))
def test_the_strict_variant_is_the_paper_and_nothing_else(name, train, test):
  c = experiment_config(name, 'paper')
  configs.check_train_config(c)
  d, m, t = c.data, c.model, c.train
  # Stated (section 2.3): ResNet-101-FPN, resized to 1024 x 1024, Adam at 0.001, 300 epochs.
  assert m.backbone == 'resnet101' and tuple(d.image_size) == (1024, 1024)
  assert d.pixel_spacing_mm == 0  # resize to fit, not a physical pixel size
  assert (t.optimizer, t.learning_rate, t.schedule, t.epochs) == ('adam', 1e-3, 'constant', 300)
  # The scan counts as proportions, no validation split; ids come from a split file.
  assert d.split_fractions == pytest.approx((train / (train + test), 0.0, test / (train + test)))
  assert d.split_file == ''
  # Silent, so off.
  assert (t.warmup_steps, t.grad_clip_norm, t.weight_decay) == (0, 0.0, 0.0)
  a = d.augment
  assert not (a.flip_lr or a.flip_ud) and a.rotate_degrees == 0 and a.noise_std == 0
  assert a.scale_range == a.gamma_range == a.intensity_scale_range == (1.0, 1.0)
  assert not a.get('contrast', {}).get('enabled', False)
  assert m.mask_dice_weight == m.boundary_loss_weight == 0 and not m.point_head.enabled
  assert m.keep_largest_component == m.keep_largest_cluster == m.keep_attached == ()
  assert (m.paint_rule, m.paint_slots_per_class) == ('each', 0)
  assert m.label_score_threshold == m.test_score_threshold
  assert tuple(m.anchor_ratios) == (0.5, 1.0, 2.0) and m.roi_hard_negative_fraction == 0
  assert not (m.imask.reduce or m.imask.skip_projection) and m.imask.fuse_convs == 0
  assert m.imask.fine_dim == m.mask_head_dim and m.mask_head == 'imask'
  # The likeliest meaning of the 300 epochs: Matterport's 1000 steps of 2 images.
  assert (t.steps_per_epoch, t.batch_size) == (1000, 2)
  assert t.steps == configs.resolve_steps(c, 10**6) == 300_000


def test_full_passes_counts_epochs_over_the_training_slices():
  c = experiment_config('oai', 'paper,full_passes')
  assert c.train.steps_per_epoch == 0 and c.train.batch_size == 2
  assert c.train.steps == math.ceil(300 * 470 * 160 / 2) == 11_280_000
  assert configs.resolve_steps(c, 50_000) == 7_500_000
  with pytest.raises(ValueError, match='full_passes needs paper'):
    experiment_config('stiho', 'full_passes')
  with pytest.raises(ValueError, match='practical and paper cannot be combined'):
    experiment_config('oai', 'practical,paper')


def test_the_recommended_settings_keep_full_passes_and_their_extras():
  for name in ('oai', 'stiho'):
    c = experiment_config(name)
    assert c.train.steps_per_epoch == 0 and c.train.grad_clip_norm == 10.0
    assert c.model.imask.reduce and c.model.imask.skip_projection and c.model.imask.fuse_convs == 1
  assert paper.paper_fractions(470, 30) == (0.94, 0.0, 0.06)


@pytest.mark.e2e
def test_the_strict_head_trains_end_to_end(tmp_path):
  """oai.py:paper,smoke: the strict settings (resize to fit, no reduction, logits on the
  concatenation, no clipping or warm-up) through the trainer on knee phantoms."""
  from imask_jax.training import train

  c = experiment_config('oai', 'paper,smoke')
  assert c.data.pixel_spacing_mm == 0 and not c.model.imask.reduce
  assert c.train.warmup_steps == 0 and c.train.grad_clip_norm == 0
  c.data.data_dir = str(tmp_path / 'tfds')
  state = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert int(state.step) == c.train.steps
  with open(tmp_path / 'run' / 'metrics.jsonl', encoding='utf-8') as f:
    assert 'val/dice_mean' in f.read()
