"""Whole-volume inference: detections pasted back at source resolution and reassembled on the
file's own grid (non-canonical orientations), the label-value mapping, effusion sides, and the
smoke model's predictions against the network-resolution label map of programs.make_detect_fn."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import instances, orientation, readers, tissues
from data_pipelines.phantoms import generate_hip, generate_knee
from imask_jax import configs, input_pipeline, metrics, parallel
from imask_jax import workdir as workdir_lib
from imask_jax.inference import loading, whole_volume
from imask_jax.ops import masks as mask_ops

# File axes point Posterior, Inferior, Left (a sagittal series as scanners store it), with
# three different voxel sizes: nothing about the grid is canonical.
PIL_AFFINE = np.array(
  [[0.0, 0.0, -1.5, 20.0], [-0.5, 0.0, 0.0, 30.0], [0.0, -0.75, 0.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)


def _config(image_size, names, values):
  c = configs.default_config()
  c.data.image_size = image_size
  c.data.class_names = names
  c.data.class_label_values = values
  return c


def _write_case(tmp_path, image, labels, affine, name='case') -> readers.Case:
  image_path = str(tmp_path / f'{name}_0000.nii.gz')
  nib.save(nib.Nifti1Image(image.astype(np.float32), affine), image_path)
  label_paths = {}
  if labels is not None:
    label_paths['default'] = str(tmp_path / f'{name}.nii.gz')
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), label_paths['default'])
  return readers.Case(name, image_path, label_paths)


def _truth_detections(stack, scale, scheme, mask_size, max_detections):
  """Per slice, every truth instance as a detection in network-input coordinates: its tight
  box times the input scale and its mask resampled into the box's m x m grid (ROIAlign, as the
  mask head's targets); scores fall with the instance order."""
  n = len(stack)
  out = {
    'boxes': np.zeros((n, max_detections, 4), np.float32),
    'scores': np.zeros((n, max_detections), np.float32),
    'classes': np.zeros((n, max_detections), np.int32),
    'valid': np.zeros((n, max_detections), bool),
    'mask_probs': np.zeros((n, max_detections, mask_size, mask_size), np.float32),
  }
  slots, masks, boxes = [], [], []
  for i in range(n):
    found = instances.extract_instances(stack.labels[i], scheme.class_map)
    k = len(found)
    out['boxes'][i, :k] = found.boxes * np.tile(scale[i], 2)
    out['scores'][i, :k] = 1.0 - 0.1 * np.arange(k)
    out['classes'][i, :k] = found.classes
    out['valid'][i, :k] = True
    slots += [(i, d) for d in range(k)]
    masks.append(found.masks)
    boxes.append(found.boxes)
  # One ROIAlign call for all instances of the volume (one compile).
  masks, boxes = np.concatenate(masks), np.concatenate(boxes)
  targets = np.asarray(mask_ops.mask_targets(masks, np.arange(len(boxes)), boxes, mask_size))
  for (i, d), target in zip(slots, targets):
    out['mask_probs'][i, d] = target
  return out


@pytest.mark.slow
def test_truth_boxes_round_trip_exactly_onto_a_non_canonical_grid(tmp_path):
  # Three disjoint cuboids with label values 2, 5, 7 (class ids 1, 2, 3) in file index space;
  # the third touches two faces of the array.
  labels = np.zeros((24, 40, 30), np.uint8)
  labels[2:10, 5:20, 3:12] = 2
  labels[12:22, 22:38, 4:17] = 5
  labels[2:8, 25:40, 15:30] = 7
  image = np.random.default_rng(0).normal(100, 20, labels.shape)
  case = _write_case(tmp_path, image, labels, PIL_AFFINE)
  volume = readers.load_volume(case, plane='sagittal', label_values=[2, 5, 7])
  config = _config((32, 32), ('a', 'b', 'c'), (2, 5, 7))
  scheme = tissues.LabelScheme.from_config(config)
  stack = readers.slices(volume)
  scale = input_pipeline.volume_inputs(volume, config)['scale']
  assert stack.images.shape[1:] == (40, 24)  # rows inferior (file axis 1), cols file axis 0
  np.testing.assert_allclose(scale[0], [32 / 40, 19 / 24], rtol=1e-6)  # not a power of two

  # A box-filling mask pastes to exactly its box, so rectangles come back voxel for voxel.
  det = _truth_detections(stack, scale, scheme, mask_size=8, max_detections=4)
  det['mask_probs'][:] = 1.0
  class_maps, pasted = whole_volume.detections_to_source(det, scale, stack.images.shape[1:])
  prediction = whole_volume.assemble(volume, class_maps, scheme)

  assert prediction.label_map.shape == labels.shape == volume.grid.shape
  np.testing.assert_array_equal(prediction.label_map, labels)
  np.testing.assert_array_equal(prediction.canonical, volume.labels)
  assert pasted.shape == (len(stack), 4) + stack.images.shape[1:]
  assert not pasted[~det['valid']].any()


@pytest.mark.slow
def test_truth_masks_round_trip_on_a_knee_phantom(tmp_path):
  """The phantom's own instance masks, resampled into 56 x 56 box grids (what the mask head
  predicts) and pasted back from a 64 x 64 network input (scale 0.5), recover the truth."""
  phantom = generate_knee(3)
  case = _write_case(tmp_path, phantom.image, phantom.labels, phantom.affine)
  volume = readers.load_volume(case, plane='sagittal', label_values=None)
  config = _config((64, 64), tissues.KNEE_CLASSES, (1, 2, 3, 4))
  scheme = tissues.LabelScheme.from_config(config)
  stack = readers.slices(volume)
  scale = input_pipeline.volume_inputs(volume, config)['scale']
  np.testing.assert_allclose(scale, 0.5)
  det = _truth_detections(stack, scale, scheme, mask_size=56, max_detections=6)
  class_maps, _ = whole_volume.detections_to_source(det, scale, stack.images.shape[1:])
  prediction = whole_volume.assemble(volume, class_maps, scheme)

  assert prediction.label_map.shape == phantom.labels.shape
  for value in (1, 2, 3, 4):
    truth, pred = phantom.labels == value, prediction.label_map == value
    dice = 2 * np.sum(truth & pred) / (truth.sum() + pred.sum())
    # Measured: femur 0.998, femoral cartilage 0.967 (a thin band resampled twice), tibia and
    # tibial cartilage >= 0.9998.
    assert dice > 0.96, (value, dice)


def test_label_scheme_maps_classes_to_label_values():
  knee = tissues.LabelScheme.from_config(_config((8, 8), tissues.KNEE_CLASSES, (1, 2, 3, 4)))
  assert knee.knee is not None and knee.effusion_value is None
  hip = tissues.LabelScheme.from_config(_config((8, 8), ('effusion',), (9,)))
  assert hip.knee is None and hip.effusion_value == 9
  np.testing.assert_array_equal(hip.to_label_values(np.array([[0, 1], [1, 0]])), [[0, 9], [9, 0]])
  with pytest.raises(ValueError, match=r'class ids in \[0, 2\]; expected 0..1'):
    hip.to_label_values(np.array([0, 2]))
  wrong_count = _config((8, 8), ('a', 'b'), (1, 2))
  wrong_count.model.num_classes = 3  # an experiment file that still sets it, wrongly
  with pytest.raises(ValueError, match='model.num_classes=3'):
    tissues.LabelScheme.from_config(wrong_count)


def test_effusion_sides_match_the_hip_phantom_truth():
  phantom = generate_hip(1)
  grid = orientation.SourceGrid.from_affine(phantom.labels.shape, phantom.affine)
  canonical = grid.to_canonical(phantom.labels)
  sides = metrics.effusion_ml_by_side(canonical, grid.canonical_spacing, 1)
  per_side = phantom.truth['effusion']['per_side']
  voxel_ml = float(np.prod(grid.canonical_spacing)) / 1000
  assert per_side['right']['voxels'] > 0 and per_side['left']['voxels'] > 0
  assert sides['right_ml'] == pytest.approx(per_side['right']['voxels'] * voxel_ml, rel=1e-9)
  assert sides['left_ml'] == pytest.approx(per_side['left']['voxels'] * voxel_ml, rel=1e-9)
  assert sides['total_ml'] == pytest.approx(sides['right_ml'] + sides['left_ml'], rel=1e-12)


def test_effusion_sides_split_the_middle_column_in_half():
  labels = np.zeros((5, 2, 2), np.uint8)  # X = 5: column 2 lies on the mid-plane
  labels[0] = 1  # 4 voxels far left
  labels[2, 0, 0] = 1  # 1 voxel on the mid-plane
  labels[4, :, 0] = 1  # 2 voxels right
  sides = metrics.effusion_ml_by_side(labels, (10.0, 10.0, 10.0), 1)  # 1 mL voxels
  assert sides == {'right_ml': 2.5, 'left_ml': 4.5, 'total_ml': 7.0}


def test_missing_checkpoint_step_lists_the_stored_ones(smoke_workdir):
  steps = loading.checkpoint_steps(smoke_workdir)
  assert steps and steps[-1] == 6
  with pytest.raises(
    FileNotFoundError,
    match=rf'no checkpoint at step 999; stored steps: '
    rf'\[.*{steps[-1]}\]',
  ):
    loading.load_model(smoke_workdir, 999)


def test_mask_threshold_is_what_both_pastes_paint_from(tmp_path, smoke_workdir, smoke_model):
  """model.mask_threshold, set in a copy of a workdir's config.json (an inference-only field,
  as docs/results/hip.md chooses it): the source-resolution paste and the network's own label
  map both use it, and a lower threshold paints a superset of the 0.5 one's pixels."""
  workdir = tmp_path / 'lower'
  shutil.copytree(smoke_workdir, workdir)
  saved = json.loads((workdir / 'config.json').read_text())
  saved['model'].update(mask_threshold=0.2, keep_largest_component=[], keep_attached=[])
  (workdir / 'config.json').write_text(json.dumps(saved))
  lower = loading.load_model(str(workdir))
  config = smoke_model.config.copy_and_resolve_references()
  config.model.keep_largest_component = config.model.keep_attached = ()
  at_half = dataclasses.replace(smoke_model, config=config)
  crop = np.transpose(generate_knee(0).image[40:104, 30:94, 27:31], (1, 0, 2))
  pixel_mm = float(config.data.pixel_spacing_mm)
  affine = PIL_AFFINE.copy()
  affine[1, 0] = affine[2, 1] = -pixel_mm
  volume = readers.load_volume(
    _write_case(tmp_path, crop, None, affine), plane='sagittal', label_values=None
  )
  painted = {}
  for name, model in (('half', at_half), ('lower', lower)):
    slices = whole_volume.predict_volume(model, volume).class_slices
    images = input_pipeline.volume_inputs(volume, model.config)['image']
    network = model.detect(model.variables, parallel.shard_batch(images, model.mesh))
    np.testing.assert_array_equal(slices, np.asarray(network['label_map']), err_msg=name)
    painted[name] = slices > 0
  assert painted['half'].any()
  assert not (painted['half'] & ~painted['lower']).any()
  assert painted['lower'].sum() > painted['half'].sum()


def test_predict_volume_equals_the_network_label_map_at_scale_one(tmp_path, smoke_model):
  """Slices of exactly the network size (scale 1): the source-resolution paste must equal the
  label map programs.make_detect_fn pastes at network resolution, slice for slice, through the
  batching and padding of a slice count (10) that is not a multiple of the batch size (4).
  The largest-component and cartilage-on-bone rules, steps on the stacked volume, are off here
  (test_largest_component.py and test_attached.py test them through predict_volume)."""
  config = smoke_model.config.copy_and_resolve_references()
  config.model.keep_largest_component = config.model.keep_attached = ()
  smoke_model = dataclasses.replace(smoke_model, config=config)
  phantom = generate_knee(0)
  # A 10-slice, 64 x 64 sagittal crop of the phantom, stored with the P, I, L axes.
  crop = np.transpose(phantom.image[40:104, 30:94, 27:37], (1, 0, 2))
  # In-plane pixels of the model's own spacing (scale-true smoke config): no resampling.
  pixel_mm = float(smoke_model.config.data.pixel_spacing_mm)
  affine = PIL_AFFINE.copy()
  affine[1, 0] = affine[2, 1] = -pixel_mm
  case = _write_case(tmp_path, crop, None, affine)
  volume = readers.load_volume(case, plane='sagittal', label_values=None)
  prediction = whole_volume.predict_volume(smoke_model, volume, keep_instances=True)
  assert prediction.label_map.shape == crop.shape
  assert prediction.class_slices.shape == (10, 64, 64)

  inputs = input_pipeline.volume_inputs(volume, smoke_model.config)
  np.testing.assert_array_equal(inputs['scale'], 1.0)
  images = np.concatenate([inputs['image'], np.zeros((2,) + inputs['image'].shape[1:])])
  expected = []
  for start in range(0, 12, 4):
    out = smoke_model.detect(
      smoke_model.variables, parallel.shard_batch(images[start : start + 4], smoke_model.mesh)
    )
    expected.append(np.asarray(out['label_map']))
  expected = np.concatenate(expected)[:10]
  assert expected.any(), 'the smoke model predicts nothing here: the comparison would be empty'
  np.testing.assert_array_equal(prediction.class_slices, expected)
  # Union painting (model.paint_rule): a pixel an instance scoring at least the label
  # threshold covers (its mask >= 0.5) is never background, and every painted class is the
  # class of such an instance of the slice.
  assert smoke_model.config.model.paint_rule == 'union'
  min_score = float(smoke_model.config.model.label_score_threshold)
  for i, slice_instances in enumerate(prediction.instances):
    painted = [inst for inst in slice_instances if inst.score >= min_score]
    covered = np.zeros((64, 64), bool)
    for inst in painted:
      covered |= inst.full_mask((64, 64))
    got = prediction.class_slices[i]
    assert not (covered & (got == 0)).any(), f'slice {i}'
    assert set(np.unique(got)) - {0} <= {inst.class_id for inst in painted}, f'slice {i}'
  np.testing.assert_array_equal(volume.grid.to_original(prediction.canonical), prediction.label_map)
  assert workdir_lib.load_config(smoke_model.workdir).data.plane == prediction.plane
