"""Converted torchvision weights give torchvision's outputs; the reader admits only tensors.

The truth is torchvision itself: tests/fixtures/torchvision/ holds state dicts of randomly
initialised torchvision models and their outputs, computed in float64 by torchvision, written by
tools/make_torchvision_fixtures.py (see its docstring for what each fixture covers). torch is
not needed here. IMASK_TORCHVISION_FIXTURES=<dir> runs the same comparisons on the full-size
fixtures that script writes with --full.

Tolerance: our float32 result against the float64 reference, per output, must be within
1e-4 of the output's largest magnitude (the issue's bound) and within 4x the distance of
torchvision's own float32 run from the same reference (recorded by the fixture script) plus
1e-6 of the scale: a float32 implementation of the same arithmetic lands at that distance; a
mapping error (a transposed kernel, a wrong epsilon, a permuted channel) lands orders above it.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import pickle
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imask_jax import convert_weights
from imask_jax.models import mask_rcnn
from imask_jax.models.densenet import DenseNet
from imask_jax.models.resnet import ResNet
from imask_jax.ops import roi_align as roi_ops
from imask_jax.weights import convert as conversion
from imask_jax.weights import pretrained, torch_checkpoint

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORED = os.path.join(HERE, 'fixtures', 'torchvision')
FIXTURES = os.environ.get('IMASK_TORCHVISION_FIXTURES', STORED)


def fixture_names(kind: str) -> list[str]:
  names = []
  for path in sorted(glob.glob(os.path.join(FIXTURES, '*.npz'))):
    with np.load(path) as z:
      if 'meta' in z.files and json.loads(str(z['meta']))['kind'] == kind:
        names.append(os.path.basename(path)[: -len('.npz')])
  return names


def load_fixture(name: str) -> tuple[dict[str, np.ndarray], dict]:
  with np.load(os.path.join(FIXTURES, f'{name}.npz')) as z:
    arrays = {k: z[k] for k in z.files if k != 'meta'}
    return arrays, json.loads(str(z['meta']))


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def assert_matches(ours, reference: np.ndarray, torch_float32_error: float, what: str):
  """The module docstring's bound: 1e-4 of the scale and 4x torchvision's own float32 error."""
  ours = np.asarray(ours, np.float64)
  assert ours.shape == reference.shape, f'{what}: shape {ours.shape} vs {reference.shape}'
  scale = float(np.abs(reference).max())
  error = float(np.abs(ours - reference).max())
  bound = min(1e-4 * scale, 4 * torch_float32_error + 1e-6 * scale)
  assert error <= bound, (
    f'{what}: max |ours - torchvision| = {error:.3g} > {bound:.3g} '
    f'(scale {scale:.3g}, torchvision float32 error '
    f'{torch_float32_error:.3g})'
  )


def convert(name: str, arch: str, **kwargs) -> conversion.Converted:
  state = torch_checkpoint.read_state_dict(os.path.join(FIXTURES, f'{name}.pth'))
  return conversion.convert_state_dict(state, arch, source=name, **kwargs)


def body_variables(converted: conversion.Converted) -> dict:
  variables = conversion.to_variables(converted)
  return {c: variables[c]['backbone']['body'] for c in ('params', 'batch_stats')}


@functools.cache
def body_apply(meta_json: str):
  """jit(apply) of the body a fixture describes (one compile per fixture and input shape;
  eager DenseNet-121 dispatch took a minute)."""
  meta = json.loads(meta_json)
  if meta['kind'] == 'resnet':
    module = ResNet(depth=meta['depth'], width=meta['width'], norm='batch')
  else:
    module = DenseNet(
      depth=meta['depth'],
      growth_rate=meta['growth_rate'],
      num_init_features=meta['num_init_features'],
      bn_size=meta['bn_size'],
      norm='batch',
    )
  return jax.jit(lambda variables, images: module.apply(variables, images, train=False))


def run_body(meta: dict, converted: conversion.Converted, images: np.ndarray) -> dict:
  return body_apply(json.dumps(meta, sort_keys=True))(body_variables(converted), images)


# --- the reader -----------------------------------------------------------------------------------


@pytest.mark.parametrize('file', ['storage_cases.pth', 'storage_cases_legacy.pth'])
def test_reader_gives_torch_values_for_views_and_every_dtype(file):
  state = torch_checkpoint.read_state_dict(os.path.join(STORED, file))
  with np.load(os.path.join(STORED, 'storage_cases.npz')) as expected:
    assert sorted(state) == sorted(expected.files)
    for key in expected.files:
      value = state[key]
      assert value.shape == expected[key].shape, key
      # bfloat16 is compared through float32, as torch's .float() wrote it.
      np.testing.assert_array_equal(value.astype(expected[key].dtype), expected[key], err_msg=key)
    assert state['half'].dtype == np.float16 and state['scalar'].dtype == np.int64


class _MakesFolder:
  """Pickles as a call to os.mkdir: what a malicious checkpoint would smuggle in."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def test_reader_refuses_any_other_global_without_calling_it(tmp_path):
  target = str(tmp_path / 'made_by_pickle')
  payload = pickle.dumps(collections.OrderedDict(weight=_MakesFolder(target)), protocol=2)
  zipped = tmp_path / 'evil.pth'
  with zipfile.ZipFile(zipped, 'w') as archive:
    archive.writestr('evil/data.pkl', payload)
    archive.writestr('evil/byteorder', 'little')
  legacy = tmp_path / 'evil_legacy.pth'
  with open(legacy, 'wb') as f:
    for header in (
      torch_checkpoint.LEGACY_MAGIC,
      torch_checkpoint.LEGACY_PROTOCOL,
      {'little_endian': True},
    ):
      pickle.dump(header, f, protocol=2)
    f.write(payload)
  for path in (zipped, legacy):
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match='mkdir'):
      torch_checkpoint.read_state_dict(path)
  assert not os.path.exists(target)


def test_reader_refuses_npz_with_objects_and_names_non_tensor_entries(tmp_path):
  np.savez(tmp_path / 'objects.npz', a=np.array([{'x': 1}], dtype=object))
  with pytest.raises(ValueError, match='allow_pickle'):
    torch_checkpoint.read_state_dict(tmp_path / 'objects.npz')
  (tmp_path / 'text.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='text.pth'):
    torch_checkpoint.read_state_dict(tmp_path / 'text.pth')


def test_legacy_file_with_old_key_names_converts_identically():
  # maskrcnn_r50w4_legacy.pth: the same weights under pre-0.13 torchvision names (as in the COCO
  # file), in the legacy torch.save format; torchvision itself loaded it back (fixture script).
  kwargs = dict(input_channels=3, input_normalization='none', keep_class_layers=True)
  new = convert('maskrcnn_r50w4', 'maskrcnn_resnet50_fpn', **kwargs)
  old = convert('maskrcnn_r50w4_legacy', 'maskrcnn_resnet50_fpn', **kwargs)
  for tree in ('params', 'batch_stats'):
    a, b = getattr(new, tree), getattr(old, tree)
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


# --- classifiers: backbone features ---------------------------------------------------------------


@pytest.mark.parametrize('name', fixture_names('resnet') + fixture_names('densenet'))
@pytest.mark.slow
def test_classifier_body_matches_torchvision(name):
  arrays, meta = load_fixture(name)
  converted = convert(name, meta['arch'], input_channels=3, input_normalization='none')
  assert converted.dropped == (
    ('fc.weight', 'fc.bias')
    if meta['kind'] == 'resnet'
    else ('classifier.weight', 'classifier.bias')
  )
  levels = run_body(meta, converted, nhwc(arrays['x']))
  for level in ('C2', 'C3', 'C4', 'C5'):
    assert_matches(
      levels[level], nhwc(arrays[level]), meta['float32_error'][level], f'{name} {level}'
    )


@pytest.mark.parametrize('name', fixture_names('resnet'))
@pytest.mark.slow
def test_grey_input_with_folded_imagenet_normalisation(name):
  """Default conversion (1 channel, ImageNet normalisation folded into the stem) on a [0, 1]
  grey image against torchvision on the normalised image copied to R, G and B."""
  arrays, meta = load_fixture(name)
  grey = nhwc(arrays['grey'])  # [1, H, W, 1] in [0, 1]
  unfolded = convert(name, meta['arch'], input_channels=3, input_normalization='none')
  mean = np.asarray(conversion.IMAGENET_MEAN, np.float32)
  std = np.asarray(conversion.IMAGENET_STD, np.float32)
  levels = run_body(meta, unfolded, np.broadcast_to((grey - mean) / std, grey.shape[:3] + (3,)))
  for level in ('C2', 'C3', 'C4', 'C5'):
    assert_matches(
      levels[level],
      nhwc(arrays[f'grey_{level}']),
      meta['float32_error'][f'grey_{level}'],
      f'{name} normalised RGB {level}',
    )

  folded = convert(name, meta['arch'])  # the CLI defaults: 1 channel, imagenet
  assert folded.params[conversion.BODY + ('stem_conv', 'kernel')].shape[2] == 1
  levels = run_body(meta, folded, grey)
  # Exact away from the border only: torchvision pads the normalised image with zeros, we pad
  # the raw one. Stem outputs 0 and 1 see the padding (7x7/2, pad 3); after the 3x3/2 max pool
  # C2 rows 0 and 1 do, and each 3x3 conv of stage 1 (three in bottleneck blocks, four in
  # basic ones) adds a row: 2 + that many C2 rows are cut at every edge.
  margin = 2 + (3 if meta['depth'] >= 50 else 4)
  cut = (slice(None), slice(margin, -margin), slice(margin, -margin))
  reference = nhwc(arrays['grey_C2'])
  assert_matches(
    np.asarray(levels['C2'])[cut],
    reference[cut],
    meta['float32_error']['grey_C2'],
    f'{name} folded C2 interior',
  )
  # ... and the border does differ, so the cut is needed (the caveat in the docs is real).
  assert np.abs(np.asarray(levels['C2']) - reference).max() > 1e-3 * np.abs(reference).max()


@pytest.mark.parametrize('name', fixture_names('densenet'))
def test_densenet_old_layer_names_convert_identically(name):
  """Files saved before torchvision 0.4 call 'norm1' 'norm.1' (torchvision renames on load)."""
  _, meta = load_fixture(name)
  state = torch_checkpoint.read_state_dict(os.path.join(FIXTURES, f'{name}.pth'))
  old = {
    k.replace('.norm1.', '.norm.1.').replace('.conv2.', '.conv.2.'): v for k, v in state.items()
  }
  assert old.keys() != state.keys()
  a = conversion.convert_state_dict(state, meta['arch'])
  b = conversion.convert_state_dict(old, meta['arch'])
  for key in a.params:
    np.testing.assert_array_equal(a.params[key], b.params[key])


# --- Mask R-CNN: body, FPN, RPN head, box head, mask head -----------------------------------------


def maskrcnn_spec(meta: dict, image_size, **overrides) -> mask_rcnn.ModelSpec:
  fields = dict(
    image_size=tuple(image_size),
    num_classes=meta['num_classes'],
    input_channels=3,
    backbone='resnet50',
    norm='frozen_batch',
    width=meta['width'],
    fpn_dim=meta['fpn_dim'],
    box_head='fc',
    box_head_dim=meta['box_head_dim'],
    mask_head='standard',
    mask_head_dim=meta['mask_head_dim'],
    anchor_sizes=conversion.TORCHVISION_ANCHOR_SIZES,
    anchor_ratios=tuple(meta['anchor_ratios']),
    roi_level_canonical=conversion.TORCHVISION_ROI_CANONICAL,
  )
  fields.update(overrides)
  return mask_rcnn.ModelSpec(**fields)


def random_variables(model: mask_rcnn.MaskRCNN, seed: int = 0) -> dict:
  """Stand-in initial values with the model's shapes (eval_shape: nothing is compiled)."""
  shapes = jax.eval_shape(lambda k: mask_rcnn.init_variables(model, k), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize('name', fixture_names('maskrcnn'))
@pytest.mark.slow
def test_maskrcnn_matches_torchvision(name, tmp_path):
  arrays, meta = load_fixture(name)
  x = nhwc(arrays['x'])
  model = mask_rcnn.MaskRCNN(maskrcnn_spec(meta, x.shape[1:3]))
  converted = convert(
    name,
    'maskrcnn_resnet50_fpn',
    input_channels=3,
    input_normalization='none',
    keep_class_layers=True,
  )
  path = str(tmp_path / 'coco.msgpack')
  conversion.save(converted, path)
  # Through the trainer's loader: frozen_batch moves scale / bias into batch_stats.
  variables, report = pretrained.merge(
    random_variables(model), path, anchor_ratios=model.spec.anchor_ratios
  )
  assert report.reinitialised == ()

  def run(m, images, box_features, mask_features):
    levels = m.backbone.body(images, train=False)
    pyramid = m.backbone(images, train=False)
    objectness, deltas = m.rpn_head(pyramid)
    cls_logits, box_deltas = m.box_head(box_features)
    mask_logits = m.mask_head(mask_features, pyramid, None, None)
    return levels, pyramid, objectness, deltas, cls_logits, box_deltas, mask_logits

  levels, pyramid, objectness, deltas, cls_logits, box_deltas, mask_logits = jax.jit(
    functools.partial(model.apply, method=run)
  )(variables, x, nhwc(arrays['box_features']), nhwc(arrays['mask_features']))
  err = meta['float32_error']
  for level in ('C2', 'C3', 'C4', 'C5'):
    assert_matches(levels[level], nhwc(arrays[level]), err[level], f'{name} body {level}')
  for level in ('P2', 'P3', 'P4', 'P5', 'P6'):
    assert_matches(pyramid[level], nhwc(arrays[level]), err[level], f'{name} FPN {level}')
  # Same anchor order, (y, x, anchor), at every level; deltas (dx, dy, dw, dh) -> (dy, dx, dh, dw).
  assert_matches(objectness, arrays['rpn_objectness'], err['rpn_objectness'], 'RPN objectness')
  assert_matches(deltas, arrays['rpn_deltas'][..., [1, 0, 3, 2]], err['rpn_deltas'], 'RPN deltas')
  k = meta['num_classes']
  assert_matches(cls_logits, arrays['cls_logits'], err['cls_logits'], 'box class logits')
  torch_deltas = arrays['box_deltas'].reshape(-1, k + 1, 4)[:, 1:, [1, 0, 3, 2]]
  assert_matches(box_deltas, torch_deltas, err['box_deltas'], 'box deltas')
  assert_matches(mask_logits, nhwc(arrays['mask_logits'][:, 1:]), err['mask_logits'], 'mask logits')


@pytest.mark.parametrize('name', fixture_names('maskrcnn'))
@pytest.mark.slow
def test_roi_align_differs_from_torchvision_by_half_a_stride(name):
  """torchvision's MultiScaleRoIAlign uses aligned=False: it samples a box at (x * scale), we at
  (x * scale - 0.5). Ours on the box shifted by half its level's stride reads torchvision's
  values, which pins the one convention difference docs/pretrained.md states."""
  arrays, meta = load_fixture(name)
  pyramid = {f'P{k}': nhwc(arrays[f'P{k}']) for k in range(2, 6)}
  xyxy = arrays['rois_xyxy'].astype(np.float64)
  rois = xyxy[:, [1, 0, 3, 2]]  # (y1, x1, y2, x2)
  size = np.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
  # torchvision's LevelMapper: floor(4 + log2(size / 224) + 1e-6), clamped to [2, 5].
  levels = np.clip(np.floor(4 + np.log2(size / 224.0) + 1e-6), 2, 5)
  assert set(levels) == {2.0, 3.0}
  shifted = rois + (2.0**levels / 2)[:, None]
  for output, key in ((7, 'box_features'), (14, 'mask_features')):
    ours = roi_ops.multilevel_roi_align(
      pyramid,
      jnp.asarray(shifted, jnp.float32),
      output,
      sampling_ratio=2,
      canonical_level=4,
      canonical_size=conversion.TORCHVISION_ROI_CANONICAL,
      batch_index=jnp.asarray(arrays['roi_batch']),
    )
    assert_matches(ours, nhwc(arrays[key]), meta['float32_error'][key], f'ROIAlign {key}')


# --- every tensor of the published architectures has its place ------------------------------------

with open(os.path.join(STORED, 'full_architectures.json')) as _f:
  FULL = {k: v for k, v in json.load(_f).items() if not k.startswith('_')}


def zeros_state(arch: str) -> dict[str, np.ndarray]:
  # Zero-stride views: the published shapes without the memory.
  return {k: np.broadcast_to(np.float32(0), shape) for k, shape in FULL[arch].items()}


def shapes_of(tree: dict) -> dict[str, tuple]:
  return {'/'.join(p): tuple(v.shape) for p, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize('arch', [a for a in sorted(FULL) if a != 'maskrcnn_resnet50_fpn'])
def test_published_classifier_maps_onto_our_body_exactly(arch):
  converted = conversion.convert_state_dict(zeros_state(arch), arch)
  if arch.startswith('resnet'):
    module = ResNet(depth=int(arch[6:]), norm='batch')
  else:
    module = DenseNet(depth=int(arch[8:]), norm='batch')
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)))
  ours = conversion.to_variables(converted)
  for collection in ('params', 'batch_stats'):
    assert shapes_of(ours[collection]['backbone']['body']) == shapes_of(shapes[collection])


def test_published_maskrcnn_maps_onto_our_model_exactly():
  arch = 'maskrcnn_resnet50_fpn'
  converted = conversion.convert_state_dict(
    zeros_state(arch), arch, input_channels=3, keep_class_layers=True
  )
  spec = maskrcnn_spec(
    {
      'num_classes': 90,
      'width': 64,
      'fpn_dim': 256,
      'box_head_dim': 1024,
      'mask_head_dim': 256,
      'anchor_ratios': (0.5, 1.0, 2.0),
    },
    (64, 64),
    norm='batch',
  )
  model = mask_rcnn.MaskRCNN(spec)
  shapes = jax.eval_shape(lambda k: mask_rcnn.init_variables(model, k), jax.random.PRNGKey(0))
  ours = conversion.to_variables(converted)
  for collection in ('params', 'batch_stats'):
    assert shapes_of(ours[collection]) == shapes_of(shapes[collection])
  dropped = conversion.convert_state_dict(zeros_state(arch), arch).dropped
  assert sorted(dropped) == sorted(
    f'roi_heads.{m}.{n}.{p}'
    for m, n in (
      ('box_predictor', 'cls_score'),
      ('box_predictor', 'bbox_pred'),
      ('mask_predictor', 'mask_fcn_logits'),
    )
    for p in ('weight', 'bias')
  )


def test_wrong_arch_is_refused_naming_the_file():
  state = torch_checkpoint.read_state_dict(os.path.join(STORED, 'resnet18_w4.pth'))
  with pytest.raises(ValueError, match=r'resnet18_w4.*layer1\.0\.conv3'):
    conversion.convert_state_dict(state, 'resnet50', source='resnet18_w4.pth')
  with pytest.raises(ValueError, match=r'resnet18_w4.*no place in resnet18.*extra'):
    conversion.convert_state_dict(
      dict(state, extra=np.zeros(3)), 'resnet18', source='resnet18_w4.pth'
    )


# --- init_from: merging into a model --------------------------------------------------------------


def small_spec(**overrides) -> mask_rcnn.ModelSpec:
  fields = dict(
    image_size=(64, 64),
    num_classes=2,
    backbone='resnet18',
    norm='batch',
    width=4,
    fpn_dim=16,
    box_head_dim=32,
    mask_head_dim=16,
  )
  fields.update(overrides)
  return mask_rcnn.ModelSpec(**fields)


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('weights') / 'resnet18_w4.msgpack')
  assert (
    convert_weights.main(
      ['--from', os.path.join(STORED, 'resnet18_w4.pth'), '--arch', 'resnet18', '--out', path]
    )
    == 0
  )
  assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith('.')] == []  # atomic
  return path


@pytest.mark.parametrize('norm', ['batch', 'frozen_batch'])
def test_init_from_replaces_the_body_and_keeps_the_rest(resnet18_file, norm):
  model = mask_rcnn.MaskRCNN(small_spec(norm=norm))
  initial = random_variables(model)
  merged, report = pretrained.merge(initial, resnet18_file)
  state = torch_checkpoint.read_state_dict(os.path.join(STORED, 'resnet18_w4.pth'))
  body = ('backbone', 'body')
  # A few arrays followed from torch's tensors by hand: layout, norm placement, grey stem.
  where = 'batch_stats' if norm == 'frozen_batch' else 'params'
  np.testing.assert_array_equal(
    merged[where]['backbone']['body']['stage2_block0']['downsample_norm']['scale'],
    state['layer2.0.downsample.1.weight'],
  )
  np.testing.assert_array_equal(
    merged['params']['backbone']['body']['stage3_block1']['conv2']['kernel'][1, 2, 3, 4],
    state['layer3.1.conv2.weight'][4, 3, 1, 2],
  )
  np.testing.assert_array_equal(
    merged['batch_stats']['backbone']['body']['stage4_block1']['norm1']['var'],
    state['layer4.1.bn1.running_var'],
  )
  # Grey stem: sum over R, G, B of weight / std (computed in float64, stored in float32).
  std = np.asarray(conversion.IMAGENET_STD, np.float64)
  grey = (state['conv1.weight'].astype(np.float64) / std[None, :, None, None]).sum(1)
  np.testing.assert_allclose(
    merged['params']['backbone']['body']['stem_conv']['kernel'][:, :, 0, :],
    grey.transpose(1, 2, 0),
    rtol=1e-7,
    atol=0,
  )
  # Every body array comes from the file, everything else keeps its initial value.
  flat_initial = {
    (c,) + p: v for c in initial for p, v in flax.traverse_util.flatten_dict(initial[c]).items()
  }
  flat_merged = {
    (c,) + p: v for c in merged for p, v in flax.traverse_util.flatten_dict(merged[c]).items()
  }
  assert flat_merged.keys() == flat_initial.keys()
  loaded = {k for k in flat_initial if k[1:3] == body}
  assert set(report.loaded) == {'/'.join(k) for k in loaded}
  assert set(report.reinitialised) == {'/'.join(k) for k in flat_initial if k not in loaded}
  for key in flat_initial:
    if key not in loaded:
      np.testing.assert_array_equal(flat_merged[key], flat_initial[key], err_msg=str(key))
  assert f'loaded {len(loaded)} arrays, re-initialised {len(flat_initial) - len(loaded)}' in (
    report.summary()
  )


def test_init_from_coco_into_imask_head_reinitialises_class_layers_and_imask_parts(tmp_path):
  arrays, meta = load_fixture('maskrcnn_r50w4')
  path = str(tmp_path / 'coco.msgpack')
  convert_weights.main(
    [
      '--from',
      os.path.join(STORED, 'maskrcnn_r50w4.pth'),
      '--arch',
      'maskrcnn_resnet50_fpn',
      '--out',
      path,
    ]
  )
  spec = maskrcnn_spec(meta, (64, 64), input_channels=1, num_classes=4, mask_head='imask')
  merged, report = pretrained.merge(
    random_variables(mask_rcnn.MaskRCNN(spec)), path, anchor_ratios=spec.anchor_ratios
  )
  reinitialised = {'/'.join(r.split('/')[1:3]) for r in report.reinitialised}
  assert reinitialised == {
    'box_head/cls',
    'box_head/deltas',
    'mask_head/reduce',
    'mask_head/decoder1',
    'mask_head/skip_proj',
    'mask_head/fuse1',
    'mask_head/logits',
  }
  assert 'batch_stats/backbone/body/stem_norm/scale' in report.loaded  # frozen_batch layout


@pytest.mark.slow
def test_init_from_errors_name_the_file_and_the_path(resnet18_file, tmp_path):
  def merge(**spec):
    model = mask_rcnn.MaskRCNN(small_spec(**spec))
    return pretrained.merge(
      random_variables(model), resnet18_file, anchor_ratios=model.spec.anchor_ratios
    )

  with pytest.raises(ValueError, match=r'resnet18_w4.msgpack.*frozen_batch'):
    merge(norm='group')
  with pytest.raises(
    ValueError,
    match=r'resnet18_w4.msgpack: params/backbone/body/stem_conv/'
    r'kernel has shape \(7, 7, 1, 4\).*\(7, 7, 3, 4\)'
    r'.*--input-channels',
  ):
    merge(input_channels=3)
  with pytest.raises(ValueError, match=r'provides backbone/body but lacks.*stage1_block2'):
    merge(backbone='resnet34')
  with pytest.raises(ValueError, match=r'shape \(4,\) in the file but \(8,\)'):
    merge(width=8)

  arrays, meta = load_fixture('maskrcnn_r50w4')
  coco = str(tmp_path / 'coco.msgpack')
  convert_weights.main(
    [
      '--from',
      os.path.join(STORED, 'maskrcnn_r50w4.pth'),
      '--arch',
      'maskrcnn_resnet50_fpn',
      '--out',
      coco,
    ]
  )
  spec = maskrcnn_spec(meta, (64, 64), input_channels=1)
  with pytest.raises(ValueError, match=r'anchor ratios \(0.5, 1.0, 2.0\).*\(1.0, 0.5, 2.0\)'):
    pretrained.merge(
      random_variables(mask_rcnn.MaskRCNN(spec)), coco, anchor_ratios=(1.0, 0.5, 2.0)
    )
  spec = maskrcnn_spec(meta, (64, 64), input_channels=1, box_head='conv')
  # The conv box head's fc1 reads 4 convs' output, not the 7x7 ROI map (and it has no fc2).
  with pytest.raises(
    ValueError,
    match=r'coco.msgpack: params/box_head/fc1/kernel has shape '
    r'\(784, 32\) in the file',
  ):
    pretrained.merge(random_variables(mask_rcnn.MaskRCNN(spec)), coco)

  for bad, match in (
    (tmp_path / 'missing.msgpack', 'does not exist'),
    (os.path.join(STORED, 'resnet18_w4.pth'), 'not a converted weights file'),
  ):
    with pytest.raises(ValueError, match=match):
      pretrained.merge({}, str(bad))


def test_converted_file_is_plain_msgpack(resnet18_file):
  with open(resnet18_file, 'rb') as f:
    record = flax.serialization.msgpack_restore(f.read())
  assert record['format'] == conversion.FORMAT and record['arch'] == 'resnet18'
  assert record['covers'] == ['backbone/body'] and record['dropped'] == ['fc.weight', 'fc.bias']
  assert record['source'] == 'resnet18_w4.pth' and len(record['source_sha256']) == 64
  assert record['input_channels'] == 1 and record['input_normalization'] == 'imagenet'
  assert 'fpn' not in record['params']['backbone']


@pytest.mark.slow
def test_init_state_starts_from_the_file(resnet18_file, capsys):
  """The trainer's entry: steps.init_state with model.init_from (the config field's default
  '' is the random initialisation)."""
  import optax

  from imask_jax import configs
  from imask_jax.training import steps

  assert configs.default_config().model.init_from == ''
  model = mask_rcnn.MaskRCNN(small_spec(norm='frozen_batch'))
  tx = optax.adam(1e-3)
  fresh = jax.eval_shape(lambda: steps.init_state(model, tx, seed=0))  # (one compile only)
  state = steps.init_state(model, tx, seed=0, init_from=resnet18_file)
  assert 'init_from' in capsys.readouterr().out  # the loaded / re-initialised counts, on screen
  expected = pretrained.read(resnet18_file).variables
  np.testing.assert_array_equal(
    state.params['backbone']['body']['stage1_block0']['conv1']['kernel'],
    expected['params']['backbone']['body']['stage1_block0']['conv1']['kernel'],
  )
  np.testing.assert_array_equal(  # frozen_batch: the file's scale is a batch statistic
    state.batch_stats['backbone']['body']['stem_norm']['scale'],
    expected['params']['backbone']['body']['stem_norm']['scale'],
  )
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  assert all(
    a.shape == b.shape and a.dtype == b.dtype
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(fresh))
  )
