"""Experiment configs: every experiment and variant builds a valid model and training config,
the paper's settings are where the experiments say they are, variants and `--config.x.y`
overrides apply, and the resolved config round-trips through the workdir's config.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, experiment_config
from data_pipelines import tissues
from data_pipelines.datasets.params import params_from_config
from data_pipelines.phantoms import hip, knee
from imask_jax import configs, errors
from imask_jax import workdir as workdir_lib
from imask_jax.models.mask_rcnn import ModelSpec

EXPERIMENTS = ('phantom_knee', 'phantom_hip', 'oai', 'stiho')
VARIANTS = (None, 'smoke', 'head=standard,backbone=densenet121,steps=7,seed=3')


@pytest.mark.parametrize('name', EXPERIMENTS)
@pytest.mark.parametrize('arg', VARIANTS)
def test_every_experiment_and_variant_builds_and_round_trips(name, arg, tmp_path):
  config = experiment_config(name, arg)
  configs.check_train_config(config)
  spec = ModelSpec.from_config(config)
  assert spec.num_classes == len(config.data.class_names)
  workdir_lib.save_config(config, str(tmp_path))
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()  # tuples come back as tuples
  assert ModelSpec.from_config(loaded) == spec
  assert params_from_config(loaded, tmp_path) == params_from_config(config, tmp_path)
  if arg and arg.startswith('head='):
    assert (config.model.mask_head, config.model.backbone) == ('standard', 'densenet121')
    assert (config.train.steps, config.train.epochs, config.seed) == (7, 0.0, 3)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_smoke_variants_are_tiny_and_run_on_phantoms(name):
  """Every smoke variant trains a few steps of a tiny model on generated phantoms of its
  anatomy (same class names and label values), so it runs anywhere in about a minute."""
  full, smoke = experiment_config(name), experiment_config(name, 'smoke')
  assert smoke.data.dataset in ('phantom_knee', 'phantom_hip')
  labels = knee.LABELS if smoke.data.dataset == 'phantom_knee' else hip.LABELS
  assert tuple(smoke.data.class_names) == tuple(full.data.class_names)
  assert tuple(smoke.data.class_label_values) == tuple(labels[n] for n in smoke.data.class_names)
  assert smoke.data.plane == (knee.PLANE if smoke.data.dataset == 'phantom_knee' else hip.PLANE)
  assert smoke.train.epochs == 0 and smoke.train.steps <= 10
  assert smoke.train.batch_size <= 2 and smoke.data.num_volumes <= 5
  assert max(smoke.data.image_size) <= 64 and smoke.model.width <= 8
  assert smoke.model.backbone == 'resnet18'


@pytest.mark.parametrize('arg', ['full', 'cartilage'])
def test_knee_variants_build_and_round_trip(arg, tmp_path):
  """The knee's longer variants: full (more phantoms and steps), cartilage (issue 11: a 140 mm
  field of view at 0.5 mm per network pixel, whose phantoms are generated that way)."""
  config = experiment_config('phantom_knee', arg)
  configs.check_train_config(config)
  workdir_lib.save_config(config, str(tmp_path))
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  assert ModelSpec.from_config(loaded) == ModelSpec.from_config(config)
  if arg == 'cartilage':
    d = config.data
    assert (d.phantom_fov_mm, d.phantom_spacing_mm, d.pixel_spacing_mm) == (140.0, 0.5, 0.5)
    assert tuple(d.image_size) == (192, 192) and config.model.point_head.enabled
    params = params_from_config(config, tmp_path)
    assert (params.phantom_fov_mm, params.phantom_spacing_mm) == (140.0, 0.5)


def test_phantom_hip_fits_the_hip_phantoms():
  c = experiment_config('phantom_hip')
  assert tuple(c.data.class_names) == ('effusion',) == tissues.HIP_CLASSES
  assert tuple(c.data.class_label_values) == (hip.LABELS['effusion'],) == (1,)
  assert c.data.plane == hip.PLANE == 'coronal'
  assert c.data.instance_mode == 'components'
  # Phantom array axes are (I, L, A); a coronal slice has rows along I and columns along L.
  # Scale-true at half the preset's in-plane spacing; the training crop lies inside a slice.
  preset = hip.PRESETS[c.data.phantom_preset]
  rows, cols, _ = preset['shape']
  assert c.data.pixel_spacing_mm == preset['spacing'][0] / 2 == preset['spacing'][1] / 2
  extent_mm = np.array([rows, cols]) * np.array(preset['spacing'][:2])
  assert np.all(np.array(c.data.image_size) * c.data.pixel_spacing_mm <= extent_mm)
  assert len(c.data.class_names) == 1 and c.data.dataset == 'phantom_hip'
  assert 'num_classes' not in c.model and ModelSpec.from_config(c).num_classes == 1
  assert experiment_config('phantom_hip', 'reader=reader2').data.reader == 'reader2'


@pytest.mark.parametrize('name', ('oai', 'stiho'))
def test_paper_experiments_have_the_papers_settings(name):
  """Section 2.3: ResNet-101-FPN, 1024 x 1024, Adam at 1e-3, 300 epochs, the iMaskRCNN head."""
  c = experiment_config(name)
  assert c.model.backbone == 'resnet101' and tuple(c.data.image_size) == (1024, 1024)
  assert c.train.optimizer == 'adam' and c.train.learning_rate == 1e-3
  assert c.train.schedule == 'constant' and c.train.epochs == 300
  assert c.model.mask_head == 'imask' and c.model.width == 64
  # The documented default step count: 300 epochs of the estimated training slices.
  module_slices = {'oai': 470 * 160, 'stiho': 125 * 24}[name]
  assert c.train.steps == math.ceil(300 * module_slices / c.train.batch_size)
  # Once the dataset is prepared the trainer uses its real size instead.
  assert configs.resolve_steps(c, 1000) == math.ceil(300 * 1000 / c.train.batch_size)


def test_oai_and_stiho_datasets():
  oai = experiment_config('oai')
  assert oai.data.dataset == 'oai_zib' and oai.data.plane == 'sagittal'
  assert tuple(oai.data.class_names) == tissues.KNEE_CLASSES
  assert tuple(oai.data.class_label_values) == (1, 2, 3, 4)  # OAI-ZIB's label values
  assert experiment_config('oai', 'nifti').data.dataset == 'nifti_folder'
  stiho = experiment_config('stiho')
  assert stiho.data.dataset == 'nifti_folder' and stiho.data.plane == 'coronal'
  assert tuple(stiho.data.class_names) == ('effusion',) and stiho.data.instance_mode == 'components'
  assert (
    stiho.data.reader == ''
    and experiment_config('stiho', 'reader=reader1').data.reader == 'reader1'
  )


def test_steps_replace_epochs_and_unknown_variants_are_refused():
  c = experiment_config('oai', 'steps=50')
  assert (c.train.steps, c.train.epochs) == (50, 0.0)
  assert configs.resolve_steps(c, 10**6) == 50
  c = experiment_config('phantom_knee', 'epochs=2.5')
  c.train.batch_size = 4
  assert configs.resolve_steps(c, 10) == 7  # ceil(2.5 * 10 / 4)
  with pytest.raises(ValueError, match=r"unknown config arguments \['hed'\]; known: .*head"):
    experiment_config('oai', 'hed=standard')


def test_config_flag_takes_a_variant_and_field_overrides(monkeypatch):
  argv = [
    'main',
    '--config=experiments/oai.py:head=standard,backbone=densenet121',
    '--config.train.learning_rate=0.5',
    '--config.data.image_size=(512,512)',
    '--config.data.manual_dir=/data/oai',
  ]
  monkeypatch.chdir(REPO)
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  c = holder.value
  assert (c.model.mask_head, c.model.backbone) == ('standard', 'densenet121')
  assert c.train.learning_rate == 0.5 and tuple(c.data.image_size) == (512, 512)
  assert c.data.manual_dir == '/data/oai' and c.train.epochs == 300
  configs.check_train_config(c)


def test_bad_training_settings_name_the_field():
  def broken(**changes):
    c = experiment_config('phantom_knee', 'smoke')
    for path, value in changes.items():
      group, field = path.split('__')
      c[group][field] = value
    return c

  cases = [
    ({'train__best_metric': 'val/loss'}, r'train\.best_metric=.*val/dice_femur'),
    ({'model__num_classes': 3}, r'model\.num_classes=3'),
    ({'train__log_every': 0}, r'train\.log_every=0'),
    ({'train__steps': 0}, r'train\.steps=0'),
    ({'train__epochs': -1.0}, r'train\.epochs=-1\.0'),
    ({'model__paint_slots_per_class': -1}, r'paint_slots_per_class=-1; .*max_detections=16'),
    ({'model__paint_slots_per_class': 17}, r'paint_slots_per_class=17'),
    ({'model__mask_threshold': 0.0}, r'model\.mask_threshold=0\.0; expected a probability'),
    ({'model__mask_threshold': 1.5}, r'model\.mask_threshold=1\.5'),
    (
      {'model__roi_hard_negative_fraction': 1.5},
      r'model\.roi_hard_negative_fraction=1\.5; expected a fraction in \[0, 1\]',
    ),
    ({'model__roi_positive_fraction': -0.1}, r'model\.roi_positive_fraction=-0\.1'),
  ]
  for changes, message in cases:
    with pytest.raises(ValueError, match=message):
      configs.check_train_config(broken(**changes))


def test_load_config_outside_a_workdir_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json in the workdir'):
    workdir_lib.load_config(str(tmp_path))


def test_a_workdir_saved_before_a_field_existed_loads_with_its_default(tmp_path):
  config = experiment_config('phantom_knee', 'smoke')
  config.model.imask.fine_dim = 12
  saved = json.loads(config.to_json())
  del saved['model']['imask']['fuse_convs'], saved['model']['boundary_loss_weight']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = workdir_lib.load_config(str(tmp_path))
  defaults = configs.default_config()
  assert loaded.model.imask.fuse_convs == defaults.model.imask.fuse_convs
  assert loaded.model.boundary_loss_weight == defaults.model.boundary_loss_weight
  assert loaded.model.imask.fine_dim == 12 and loaded.data.image_size == (64, 64)
  assert ModelSpec.from_config(loaded) == ModelSpec.from_config(config)


def test_mask_dice_argument_sets_the_dice_term_weight():
  assert experiment_config('phantom_knee').model.mask_dice_weight == 1.0  # the quick start's
  assert experiment_config('phantom_knee', 'mask_dice=0').model.mask_dice_weight == 0.0
  # The paper's settings carry the soft-Dice term learnt on the knee phantoms (a difference
  # listed in docs/reproducing.md); mask_dice=0 is the paper's BCE alone.
  assert experiment_config('oai').model.mask_dice_weight == 1.0
  assert experiment_config('oai', 'mask_dice=0').model.mask_dice_weight == 0.0
  assert experiment_config('oai', 'mask_dice=0.5').model.mask_dice_weight == 0.5


def test_volumes_argument_sets_how_many_phantoms_are_generated():
  assert experiment_config('phantom_knee', 'volumes=48').data.num_volumes == 48
  assert experiment_config('phantom_hip', 'volumes=50').data.num_volumes == 50


def test_the_skip_sampling_ratio_is_adaptive_unless_set():
  oai = ModelSpec.from_config(experiment_config('oai'))
  knee = ModelSpec.from_config(experiment_config('phantom_knee'))
  assert oai.imask.skip_sampling_ratio == knee.imask.skip_sampling_ratio == 0
  assert oai.resolved_imask.skip_sampling_ratio == 3  # 1024 px: ceil(1024 / 2 / 4 / 56)
  assert knee.resolved_imask.skip_sampling_ratio == 1  # 128 px
  assert oai.build_mask_head(parent=None).skip_sampling_ratio == 3
  config = experiment_config('oai')
  config.model.imask.skip_sampling_ratio = 2
  assert ModelSpec.from_config(config).build_mask_head(parent=None).skip_sampling_ratio == 2


def test_an_unknown_thickness_method_is_refused_before_training():
  config = experiment_config('phantom_knee', 'smoke')
  config.eval.thickness_method = 'normals'
  with pytest.raises(ValueError, match=r"eval.thickness_method='normals'; expected one of"):
    configs.check_train_config(config)
  config.eval.thickness_method = 'normal'
  configs.check_train_config(config)


def test_the_real_data_experiments_carry_what_the_phantoms_taught():
  # The hip phantoms' false-positive settings (docs/results/hip.md) and the knee phantoms'
  # soft-Dice term and largest bone component, each listed in docs/reproducing.md.
  hip_phantom, stiho = experiment_config('phantom_hip'), experiment_config('stiho')
  for field in (
    'roi_hard_negative_fraction',
    'label_score_threshold',
    'keep_largest_cluster',
    'cluster_radius_mm',
    'cluster_per_side',
    'cluster_min_ml',
  ):
    assert stiho.model[field] == hip_phantom.model[field], field
  assert stiho.data.empty_slice_rate == hip_phantom.data.empty_slice_rate == 0.5
  oai, knee_phantom = experiment_config('oai'), experiment_config('phantom_knee')
  assert oai.model.keep_largest_component == knee_phantom.model.keep_largest_component
  assert oai.model.mask_dice_weight == knee_phantom.model.mask_dice_weight == 1.0


@pytest.mark.parametrize(
  'name, arg, phantom, spacing',
  [('oai', 'oaizib_cm,small', 'phantom_knee', 0.5), ('stiho', 'small', 'phantom_hip', 1.1)],
)
def test_small_first_runs_take_the_quick_start_network(name, arg, phantom, spacing):
  small, quick = experiment_config(name, arg), experiment_config(phantom)
  configs.check_train_config(small)
  for field in ('backbone', 'width', 'fpn_dim', 'box_head_dim', 'mask_head_dim', 'anchor_sizes'):
    assert small.model[field] == quick.model[field], field
  assert small.train.batch_size == quick.train.batch_size == 4
  assert (small.train.steps, small.train.epochs) == (6000, 0.0)
  assert small.data.pixel_spacing_mm == spacing
  assert small.data.dataset == 'nifti_folder'  # the user's data, never phantoms


def test_oaizib_cm_reads_tibial_cartilage_from_both_of_its_labels():
  config = experiment_config('oai', 'oaizib_cm')
  assert config.data.dataset == 'nifti_folder'
  scheme = tissues.LabelScheme.from_config(config)
  assert scheme.class_map == {1: 1, 2: 2, 3: 3, 4: 4, 5: 4}
  assert scheme.names_by_value[4] == tissues.TIBIAL_CARTILAGE
  parts = experiment_config('oai', 'oaizib_cm,tibial_parts')
  configs.check_train_config(parts)
  assert tissues.LabelScheme.from_config(parts).parts == {
    tissues.MEDIAL_TIBIAL_CARTILAGE: (tissues.TIBIAL_CARTILAGE, 4),
    tissues.LATERAL_TIBIAL_CARTILAGE: (tissues.TIBIAL_CARTILAGE, 5),
  }
  with pytest.raises(ValueError, match='tibial_parts needs oaizib_cm'):
    experiment_config('oai', 'tibial_parts')
  config.data.class_label_values = (1, 2, 3, (4, 3))
  with pytest.raises(ValueError, match='a label value belongs to two classes'):
    configs.check_train_config(config)


def test_practical_is_the_docstrings_one_gpu_recipe_and_combines_with_oaizib_cm(tmp_path):
  """experiments/oai.py's `practical` (docs/training_cost.md): ResNet-50-FPN with the iMask and
  point heads, an OAI slice whole at 512 x 512 (0.2734 mm), the paper's 1024-pixel anchors and
  FPN level rule halved, batch 8, 150,000 steps; on OAIZIB-CM as released; never on phantoms."""
  paper = experiment_config('oai', 'oaizib_cm')
  config = experiment_config('oai', 'oaizib_cm,practical')
  configs.check_train_config(config)
  d, m, t = config.data, config.model, config.train
  assert d.pixel_spacing_mm == 0.2734 and tuple(d.image_size) == (512, 512)
  assert round(384 * 0.3646 / d.pixel_spacing_mm) == 512  # an OAI DESS slice, whole
  assert (m.backbone, m.width, m.mask_head, m.point_head.enabled) == ('resnet50', 64, 'imask', True)
  assert tuple(m.anchor_sizes) == tuple(s // 2 for s in paper.model.anchor_sizes)
  assert m.roi_level_canonical == paper.model.roi_level_canonical / 2
  assert (t.batch_size, t.steps, t.epochs) == (8, 150_000, 0.0)
  # The rest is oai.py's: OAIZIB-CM's labels, the paper's optimiser, random init until the
  # user adds init_from (a variant cannot name a file).
  assert d.dataset == 'nifti_folder' and tuple(d.class_label_values) == (1, 2, 3, (4, 5))
  for field in ('optimizer', 'learning_rate', 'schedule', 'warmup_steps'):
    assert t[field] == paper.train[field], field
  assert (m.init_from, m.norm) == ('', 'group')
  workdir_lib.save_config(config, str(tmp_path))
  assert workdir_lib.load_config(str(tmp_path)).to_dict() == config.to_dict()
  for other in ('smoke', 'small'):
    with pytest.raises(ValueError, match=f'practical and {other}|{other} and practical'):
      experiment_config('oai', f'practical,{other}')


def test_a_workdir_saved_with_model_num_classes_loads_and_resumes_without_it(tmp_path):
  """model.num_classes follows from data.class_names: a config.json that still holds it (every
  workdir saved before) loads without it and resumes under today's config; one whose count
  disagrees with its class names is refused, naming the file."""
  config = experiment_config('phantom_knee', 'smoke')
  saved = json.loads(config.to_json())
  saved['model']['num_classes'] = len(saved['data']['class_names'])
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  loaded = workdir_lib.load_config(str(tmp_path))
  assert 'num_classes' not in loaded.model
  assert workdir_lib.changed_fields(loaded.to_dict(), config.to_dict()) == []
  workdir_lib.check_resumable(config, str(tmp_path))  # no SettingsChangedError

  saved['model']['num_classes'] = 3
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(
    errors.SettingsChangedError, match=r'config\.json: config model\.num_classes=3'
  ):
    workdir_lib.load_config(str(tmp_path))
