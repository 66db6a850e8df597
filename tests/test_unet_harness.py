"""The U-Net in the project's harness (`model.kind = 'unet'`): the config switch and old
workdirs, the probabilities' way back to the scan's own grid (inference/semantic.py) against NumPy
truth, predict_volume's label maps and instances, and train -> resume -> evaluate through
the real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, experiment_config
from data_pipelines import readers, tissues
from imask_jax import configs, parallel
from imask_jax import workdir as workdir_lib
from imask_jax.inference import loading, semantic, whole_volume
from imask_jax.models import build
from imask_jax.models.mask_rcnn import MaskRCNN
from imask_jax.models.spec import model_kind
from imask_jax.models.unet import UNet

# --- the switch ----------------------------------------------------------------------------------


def test_the_unet_variant_builds_a_unet_and_the_default_stays_mask_rcnn():
  unet = experiment_config('phantom_knee', 'unet')
  assert unet.model.kind == 'unet'
  configs.check_train_config(unet)
  model = build.build_model(unet)
  assert isinstance(model, UNet)
  assert model.spec.image_size == (128, 128) and model.spec.width == 16
  assert isinstance(build.build_model(experiment_config('phantom_knee')), MaskRCNN)


@pytest.mark.parametrize(
  'name, arg, depth, width, size',
  [
    ('phantom_hip', 'unet', 6, 16, (256, 256)),
    ('phantom_hip', 'unet,smoke', 4, 8, (64, 64)),
    ('phantom_knee', 'unet,smoke', 4, 8, (64, 64)),
    ('phantom_knee', 'unet,encoder=resnet18', 6, 16, (128, 128)),
    ('phantom_knee', 'unet,encoder=resnet18,smoke', 6, 8, (64, 64)),
  ],
)
def test_unet_variants_of_the_phantom_experiments(name, arg, depth, width, size):
  config = experiment_config(name, arg)
  configs.check_train_config(config)
  spec = build.build_model(config).spec
  assert (spec.depth, spec.width, spec.image_size) == (depth, width, size)
  assert spec.encoder == (arg.split('encoder=')[1].split(',')[0] if 'encoder=' in arg else 'plain')
  assert spec.encoder_width == int(config.model.width)
  # The crop is a whole number of the net's coarsest cells: training never pads inside it.
  assert size[0] % spec.size_multiple == 0 == size[1] % spec.size_multiple


def test_a_workdir_saved_before_model_kind_loads_as_mask_rcnn(tmp_path):
  saved = json.loads(experiment_config('phantom_knee', 'smoke').to_json())
  del saved['model']['kind']
  del saved['model']['unet']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.model.kind == 'maskrcnn'
  assert isinstance(build.build_model(loaded), MaskRCNN)


def test_a_unet_workdir_saved_before_encoders_and_windows_loads_as_it_ran(tmp_path):
  """A U-Net workdir without model.unet.encoder / sliding_window: the plain encoder and whole
  slices however large, as it ran (and as a new config does by default)."""
  config = experiment_config('phantom_knee', 'unet')
  config.model.unet.sliding_window = True
  saved = json.loads(config.to_json())
  for field in ('encoder', 'sliding_window', 'window_overlap', 'window_gaussian'):
    del saved['model']['unet'][field]
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert loaded.model.unet.encoder == 'plain' and not loaded.model.unet.sliding_window
  spec = build.build_model(loaded).spec
  assert spec.encoder == 'plain' and not spec.sliding_window
  # Switching windows on or off when resuming is allowed: it shapes no checkpoint array.
  os.makedirs(tmp_path / 'checkpoints')
  workdir_lib.check_resumable(config, str(tmp_path))


def test_an_unknown_kind_or_converted_weights_for_a_unet_are_refused():
  config = experiment_config('phantom_knee', 'unet')
  config.model.kind = 'fcn'
  with pytest.raises(ValueError, match="model.kind='fcn'"):
    configs.check_train_config(config)
  config = experiment_config('phantom_knee', 'unet')
  config.model.init_from = 'weights.npz'
  with pytest.raises(ValueError, match='model.init_from.*plain encoder'):
    configs.check_train_config(config)
  config.model.unet.encoder = 'resnet18'  # a backbone encoder takes converted weights
  assert model_kind(config) == 'unet'


# --- probabilities back to the source grid -------------------------------------------------------


def numpy_linear(probs: np.ndarray, s: float, out: tuple[int, int]) -> np.ndarray:
  """Upsampling reference: the value at each source pixel centre (r + 0.5) x s - 0.5 in
  network pixel indices, bilinear, clamped at the array's edges. probs [H, W, K]."""
  h, w, _ = probs.shape
  result = np.zeros(out + probs.shape[-1:])
  for r in range(out[0]):
    for c in range(out[1]):
      y = min(max((r + 0.5) * s - 0.5, 0), h - 1)
      x = min(max((c + 0.5) * s - 0.5, 0), w - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      wy, wx = y - y0, x - x0
      result[r, c] = (
        (1 - wy) * (1 - wx) * probs[y0, x0]
        + (1 - wy) * wx * probs[y0, x1]
        + wy * (1 - wx) * probs[y1, x0]
        + wy * wx * probs[y1, x1]
      )
  return result


def random_probs(shape, seed=0) -> np.ndarray:
  z = np.random.default_rng(seed).normal(size=shape)
  return (np.exp(z) / np.exp(z).sum(-1, keepdims=True)).astype(np.float32)


def test_probabilities_at_the_same_spacing_come_back_unchanged():
  probs = random_probs((2, 12, 10, 3))
  out, classes = semantic.probs_to_source(probs, np.ones((2, 2), np.float32), (12, 10))
  np.testing.assert_allclose(out, probs, atol=1e-6)
  np.testing.assert_array_equal(classes, probs.argmax(-1))


def test_a_finer_source_interpolates_the_probabilities_linearly():
  # A source of 0.4 mm pixels under a 1.0 mm network: scale = 0.4.
  probs = random_probs((1, 6, 5, 3), seed=1)
  out, classes = semantic.probs_to_source(probs, np.full((1, 2), 0.4, np.float32), (15, 12))
  expected = numpy_linear(probs[0], 0.4, (15, 12))
  np.testing.assert_allclose(out[0], expected, atol=1e-5)
  np.testing.assert_array_equal(classes[0], expected.argmax(-1))


def test_a_coarser_source_averages_the_network_pixels_it_covers():
  # Scale 2: source pixel r covers network pixels 2r and 2r + 1; the linear kernel stretched
  # to the source pixel weighs 2r - 1 .. 2r + 2 as 1 : 3 : 3 : 1 (renormalised at the edges).
  probs = random_probs((1, 8, 8, 2), seed=2)
  out, _ = semantic.probs_to_source(probs, np.full((1, 2), 2.0, np.float32), (4, 4))
  kernel = {-1: 1.0, 0: 3.0, 1: 3.0, 2: 1.0}
  expected = np.zeros((4, 4, 2))
  for r in range(4):
    for c in range(4):
      total, weight = 0.0, 0.0
      for dy, ky in kernel.items():
        for dx, kx in kernel.items():
          y, x = 2 * r + dy, 2 * c + dx
          if 0 <= y < 8 and 0 <= x < 8:
            total = total + ky * kx * probs[0, y, x]
            weight += ky * kx
      expected[r, c] = total / weight
  np.testing.assert_allclose(out[0], expected, atol=1e-5)


def test_regions_are_scored_by_their_mean_class_probability():
  classes = np.zeros((6, 6), np.int32)
  classes[0:2, 0:2] = 1
  classes[4:6, 4:6] = 1  # a second piece of class 1
  classes[0:2, 4:6] = 2
  probs = np.zeros((6, 6, 3), np.float32)
  probs[..., 1] = np.linspace(0.1, 0.9, 36).reshape(6, 6)
  probs[..., 2] = 0.7
  ids, scores, valid, masks = semantic.slice_regions(classes, probs, 2, 'per_class')
  assert ids.tolist() == [1, 2] and valid.all()
  np.testing.assert_allclose(scores, [probs[..., 1][classes == 1].mean(), 0.7], rtol=1e-6)
  np.testing.assert_array_equal(masks[0], classes == 1)
  ids, scores, _, masks = semantic.slice_regions(classes, probs, 2, 'components')
  assert ids.tolist() == [1, 1, 2]
  np.testing.assert_allclose(scores[1], probs[4:6, 4:6, 1].mean(), rtol=1e-6)


# --- a whole volume ------------------------------------------------------------------------------


def half_class_model(config, boundary_rows: int):
  """An `loading.LoadedModel` whose U-Net output is certain: class 1 on network rows
  < boundary_rows, background below (what it paints at any source spacing is known)."""
  k = len(config.data.class_names) + 1

  def detect(variables, images):
    b, h, w, _ = images.shape
    labels = np.where(np.arange(h)[:, None] < boundary_rows, 1, 0) * np.ones((1, w), int)
    probs = np.broadcast_to(np.eye(k, dtype=np.float32)[labels], (b, h, w, k))
    return {'probs': probs, 'label_map': np.broadcast_to(labels, (b, h, w))}

  return loading.LoadedModel(
    workdir='fake',
    config=config,
    scheme=tissues.LabelScheme.from_config(config),
    step=0,
    variables=None,
    detect=detect,
    mesh=parallel.data_mesh(),
    batch_size=int(config.eval.batch_size),
  )


def test_a_unet_label_map_lands_on_the_scans_own_grid(tmp_path):
  config = experiment_config('phantom_knee', 'unet,smoke')
  config.model.keep_largest_component = ()
  network_mm = float(config.data.pixel_spacing_mm)  # 1.6 mm
  model = half_class_model(config, boundary_rows=32)  # class 1 above 32 x 1.6 = 51.2 mm
  # A sagittal scan of 1.0 mm pixels, 80 x 70 (canonical x, y, z: a slice is [z, y]).
  image = np.random.default_rng(0).gamma(2.0, 100.0, (3, 70, 80)).astype(np.float32)
  path = str(tmp_path / 'scan.nii.gz')
  nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.0, 1.0, 1.0])), path)
  volume = loading.load_image(path, 'sagittal')
  prediction = whole_volume.predict_volume(model, volume, keep_instances=True)
  stack = readers.slices(volume)
  assert prediction.label_map.shape == volume.grid.shape
  # Source row r (centre r + 0.5 mm) is class 1 where the centre lies above 51.2 mm.
  expected = np.zeros(stack.images.shape[1:], np.int32)
  expected[: int(np.ceil(32 * network_mm - 0.5))] = 1
  assert int(np.ceil(32 * network_mm - 0.5)) == 51
  for class_slice in prediction.class_slices:
    np.testing.assert_array_equal(class_slice, expected)
  for found in prediction.instances:
    assert [inst.class_id for inst in found] == [1]
    np.testing.assert_array_equal(found[0].full_mask(expected.shape), expected == 1)
    assert 0.9 < found[0].score <= 1.0


def test_a_unet_report_speaks_of_regions_and_probabilities_not_detections(tmp_path):
  """predict's report (scan_report.volume_report) of a U-Net: its quality block names painted
  regions and class probabilities; nothing in it speaks of detections or mask slots, and an
  all-background prediction is flagged as an empty label map."""
  from imask_jax.predict import scan_report

  config = experiment_config('phantom_knee', 'unet,smoke')
  config.model.keep_largest_component = ()
  image = np.random.default_rng(0).gamma(2.0, 100.0, (3, 70, 80)).astype(np.float32)
  path = str(tmp_path / 'scan.nii.gz')
  nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.0, 1.0, 1.0])), path)
  volume = loading.load_image(path, 'sagittal')
  for rows, empty in ((32, False), (0, True)):
    model = half_class_model(config, boundary_rows=rows)
    prediction = whole_volume.predict_volume(model, volume, keep_instances=True)
    assert prediction.unpainted_detections is None
    report = scan_report.volume_report(
      prediction, model, input_path=path, label_map_path=str(tmp_path / 'out.nii.gz')
    )
    block = report['quality']
    text = json.dumps(report).lower()
    assert 'detection' not in text and 'slot' not in text, text
    assert {'mean_region_probability', 'painted_regions'} <= set(block)
    codes = [f['code'] for f in block['flags']]
    if empty:
      assert 'empty_label_map' in codes and block['painted_regions'] == 0
      assert block['mean_region_probability'] is None
    else:
      # One class-1 region per slice, certain: probability 1, nothing flagged about it.
      assert block['painted_regions'] == 3 and block['mean_region_probability'] > 0.99
      assert not {'empty_label_map', 'low_probability'} & set(codes)
  # A low mean probability in the U-Net's words (and Mask R-CNN's block as it was).
  raw = {
    'review': True,
    'flags': [{'code': 'low_detection_score', 'message': 'mean detection score ...'}],
    'mean_detection_score': 0.6,
    'painting_detections': 4,
  }
  out = scan_report.semantic_quality(raw)
  assert out['flags'] == [
    {
      'code': 'low_probability',
      'message': 'mean class probability 0.600 < 0.75 over the 4 painted regions (a tissue in '
      'a slice)',
    }
  ]
  assert (out['mean_region_probability'], out['painted_regions'], out['review']) == (0.6, 4, True)


# --- the real commands ---------------------------------------------------------------------------


def run_module(module: str, *args: str) -> str:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  done = subprocess.run(
    [sys.executable, '-m', module, *args], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout + done.stderr


@pytest.mark.e2e
def test_unet_trains_resumes_and_evaluates_through_the_commands(tmp_path):
  workdir = str(tmp_path / 'run')
  config = ['--config', 'experiments/phantom_knee.py:unet,smoke']
  data = f'--config.data.data_dir={tmp_path / "tfds"}'
  run_module('imask_jax.main', *config, data, '--workdir', workdir)
  saved = workdir_lib.load_config(workdir)
  assert saved.model.kind == 'unet'
  assert loading.checkpoint_steps(workdir)[-1] == 6
  log = run_module('imask_jax.main', *config, data, '--config.train.steps=8', '--workdir', workdir)
  assert 'resumed from the checkpoint of step 6' in log
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'train/loss' in r][-1] == 8
  assert any('val/dice_mean' in r for r in rows)

  run_module('imask_jax.evaluate', '--workdir', workdir)
  out = os.path.join(workdir, 'eval', '8')
  with open(os.path.join(out, 'eval.json')) as f:
    info = json.load(f)
  assert info['cases']
  with open(os.path.join(out, 'metrics.csv')) as f:
    header, *lines = f.read().splitlines()
  tissue_names = {line.split(',')[header.split(',').index('tissue')] for line in lines}
  assert set(tissues.KNEE_CLASSES) <= tissue_names
  sources = tmp_path / 'tfds' / 'phantom_sources'
  for case in info['cases']:
    label = nib.load(os.path.join(out, 'labels', f'{case}.nii.gz'))
    (image_path,) = sources.glob(f'*/images*/{case}_0000.nii.gz')
    image = nib.load(str(image_path))
    assert label.shape == image.shape
    np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3, 4}
