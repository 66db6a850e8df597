"""Checkpoint evaluation: the files and columns it promises, metric values equal to direct calls
of imask_jax.metrics on the saved label maps, COCO mask AP against hand-derived values, and the
effusion agreement tables with an oracle model on hip phantoms."""

from __future__ import annotations

import csv
import math
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import instances, readers, tissues
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from imask_jax import configs, metrics
from imask_jax.evaluation import held_out, report
from imask_jax.inference import whole_volume
from imask_jax.metrics import CaseStatus


def _read_csv(path):
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


# --- on the smoke-trained workdir ----------------------------------------------------------------


def test_evaluate_smoke_workdir_writes_what_it_promises(smoke_workdir, smoke_model):
  result = held_out.evaluate_workdir(smoke_workdir, model=smoke_model)
  out = result.out_dir
  assert out == os.path.join(smoke_workdir, 'eval', '6')
  config = smoke_model.config
  data_dir = config.data.data_dir
  source = sources.volume_source(params_lib.params_from_config(config, data_dir), data_dir, 'test')
  cases = {c.case_id: c for c in source.cases}
  knee = list(tissues.KNEE_CLASSES)

  columns, rows = _read_csv(os.path.join(out, 'metrics.csv'))
  assert tuple(columns) == report.METRICS_COLUMNS
  assert sorted((r['case_id'], r['tissue']) for r in rows) == sorted(
    (c, t) for c in cases for t in knee
  )
  for name in ('summary.md', 'eval.json', 'ap.csv', 'thickness.csv'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  for case_id in cases:
    for figure in (
      f'overlay_{case_id}.png',
      f'thickness_{case_id}_femoral.png',
      f'thickness_{case_id}_tibial.png',
    ):
      with open(os.path.join(out, 'figures', figure), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith('.')]  # no temporaries

  # Recompute every value from the saved label maps on the FILE's grid, with the spacing of the
  # file's axes (the evaluation works on the canonical grid: both must agree).
  for row in rows:
    case = cases[row['case_id']]
    image = nib.load(case.image)
    saved = nib.load(os.path.join(out, 'labels', f'{case.case_id}.nii.gz'))
    assert saved.shape == image.shape
    np.testing.assert_array_equal(saved.affine, image.affine)
    pred = np.asarray(saved.dataobj)
    truth = np.asarray(nib.load(case.labels['default']).dataobj).astype(np.uint8)
    spacing = saved.header.get_zooms()[:3]
    value = int(row['label_value'])
    overlap = metrics.overlap_metrics(pred == value, truth == value)
    surface = metrics.surface_metrics(pred == value, truth == value, spacing, voxel_hausdorff=True)
    assert row['status'] == str(overlap.status)
    for column, expected in (
      ('dice', overlap.dice),
      ('precision', overlap.precision),
      ('recall', overlap.recall),
      ('jaccard', overlap.jaccard),
      ('hausdorff_mm', surface.hausdorff_mm),
      ('hd95_mm', surface.hd95_mm),
      ('assd_mm', surface.assd_mm),
      ('signed_mean_mm', surface.signed_mean_mm),
      ('signed_sd_mm', surface.signed_sd_mm),
      ('hausdorff_voxels', surface.hausdorff_voxels),
      ('pred_ml', metrics.volume_ml(pred == value, spacing)),
      ('truth_ml', metrics.volume_ml(truth == value, spacing)),
    ):
      assert float(row[column]) == pytest.approx(expected, rel=1e-5, abs=1e-9), column
    assert int(row['false_negative_voxels']) == np.sum((truth == value) & (pred != value))

  # Thickness: nibabel's own reorientation to RAS+ of the saved and the truth files, measured
  # with the workdir's method (the surface-normal one for a new run).
  method = config.eval.thickness_method
  assert method == 'normal'
  _, thickness_rows = _read_csv(os.path.join(out, 'thickness.csv'))
  for row in thickness_rows:
    case = cases[row['case_id']]
    pred = nib.as_closest_canonical(nib.load(os.path.join(out, 'labels', f'{case.case_id}.nii.gz')))
    truth = nib.as_closest_canonical(nib.load(case.labels['default']))
    spacing = pred.header.get_zooms()[:3]
    plates = metrics.compare_thickness(
      np.asarray(pred.dataobj),
      np.asarray(truth.dataobj).astype(np.uint8),
      spacing,
      angle_bin_deg=metrics.femoral_angle_bin_deg(spacing),
      method=method,
    )
    plate = plates[row['plate']]
    assert row['status'] == str(plate.status)
    assert float(row['difference_mean_mm']) == pytest.approx(
      plate.difference.mean_mm, rel=1e-9, nan_ok=True
    )
    assert float(row['difference_sd_mm']) == pytest.approx(
      plate.difference.sd_mm, rel=1e-9, nan_ok=True
    )
    assert float(row['truth_mean_mm']) == pytest.approx(plate.truth.mean_thickness_mm, rel=1e-9)

  columns, ap_rows = _read_csv(os.path.join(out, 'ap.csv'))
  assert tuple(columns) == report.AP_COLUMNS
  assert {(r['scope'], r['tissue']) for r in ap_rows} == {
    (s, t) for s in ['all', *cases] for t in knee
  }
  for r in ap_rows:
    assert 0.0 <= float(r['ap']) <= 1.0 and int(r['truth_instances']) > 0

  with open(os.path.join(out, 'summary.md')) as f:
    summary = f.read()
  assert summary == result.summary
  for heading in (
    '## Segmentation (paper Table 3)',
    '## Signed surface distance (paper Table 4)',
    '## Cartilage thickness (paper Table 5)',
    '## Missed and false-positive structures',
  ):
    assert heading in summary
  assert '| Metric | femur | femoral_cartilage | tibia | tibial_cartilage |' in summary


# --- mask AP -------------------------------------------------------------------------------------


def _square(top, left, size=10, shape=(40, 40)):
  mask = np.zeros(shape, bool)
  mask[top : top + size, left : left + size] = True
  return mask


def _instance(class_id, score, mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  return whole_volume.Instance(class_id, score, int(rows[0]), int(cols[0]), crop)


def test_format_summary_counts_missing_structures():
  dice = metrics.summarize_values(
    [0.9, 0.0, math.nan], [CaseStatus.OK, CaseStatus.MISSED, CaseStatus.BOTH_EMPTY]
  )
  assert report.format_summary(dice) == '0.450 ± 0.636 (n=2); 1 missed, 1 both empty'
  distance = metrics.summarize_values(
    [1.0, 3.0, math.inf], [CaseStatus.OK, CaseStatus.OK, CaseStatus.FALSE_POSITIVE]
  )
  assert report.format_summary(distance, 1) == '2.0 ± 1.4 over 2 of 3; 1 false positive'


# --- effusion: an oracle model on hip phantoms ----------------------------------------------------


def _hip_config(data_dir):
  c = configs.default_config()
  c.data.dataset = 'phantom_hip'
  c.data.data_dir = str(data_dir)
  c.data.num_volumes = 3
  c.data.split_fractions = (0.0, 0.0, 1.0)
  c.data.plane = 'coronal'
  c.data.class_names = tissues.HIP_CLASSES
  c.data.class_label_values = (1,)
  c.data.instance_mode = 'components'
  return c


def _oracle(scheme, instance_mode):
  """A perfect model: the truth as prediction, each truth instance detected with score 1."""

  def predict(volume):
    stack = readers.slices(volume)
    class_slices = np.zeros(stack.labels.shape, np.int32)
    for value, class_id in scheme.class_map.items():
      class_slices[stack.labels == value] = class_id
    found = []
    for labels in stack.labels:
      extracted = instances.extract_instances(labels, scheme.class_map, mode=instance_mode)
      found.append(
        tuple(_instance(int(c), 1.0, m) for c, m in zip(extracted.classes, extracted.masks))
      )
    return whole_volume.assemble(volume, class_slices, scheme, found)

  return predict


@pytest.mark.slow
def test_effusion_tables_with_an_oracle_model(tmp_path):
  config = _hip_config(tmp_path / 'tfds')
  source = sources.volume_source(
    params_lib.params_from_config(config, config.data.data_dir), config.data.data_dir, 'test'
  )
  assert len(source.cases) == 3
  scheme = tissues.LabelScheme.from_config(config)
  header = {
    'workdir': 'oracle',
    'checkpoint_step': 0,
    'split': 'test',
    'dataset': 'phantom_hip',
    'mask_head': 'none',
    'backbone': 'none',
  }
  out = str(tmp_path / 'eval')
  result = held_out.evaluate_source(config, source, _oracle(scheme, 'components'), out, header)

  _, rows = _read_csv(os.path.join(out, 'metrics.csv'))
  assert len(rows) == 3 and all(
    float(r['dice']) == 1.0 and float(r['hd95_mm']) == 0.0 for r in rows
  )
  assert result.ap[1].ap == pytest.approx(1.0) and result.ap[1].truth_instances > 3

  # volumes.csv: every rater's total from its own label file, sides from the phantom truth.
  columns, volume_rows = _read_csv(os.path.join(out, 'volumes.csv'))
  assert tuple(columns) == report.VOLUME_COLUMNS
  folder = sources.phantom_dir(
    params_lib.params_from_config(config, config.data.data_dir), config.data.data_dir
  )
  files = {
    'reference': 'labelsTr',
    'reader1': 'labelsTr_reader1',
    'reader2': 'labelsTr_reader2',
    'model': 'labelsTr',
  }  # the oracle is the truth
  by_key = {(r['case_id'], r['rater']): r for r in volume_rows}
  assert len(by_key) == 3 * 4
  totals = {rater: [] for rater in files}
  for case in source.cases:
    for rater, sub in files.items():
      image = nib.load(os.path.join(folder, sub, f'{case.case_id}.nii.gz'))
      ml = (
        np.count_nonzero(np.asarray(image.dataobj) == 1)
        * np.prod(image.header.get_zooms()[:3])
        / 1000
      )
      assert float(by_key[(case.case_id, rater)]['total_ml']) == pytest.approx(ml, rel=1e-6)
      totals[rater].append(ml)
    truth_sides = _phantom_sides(folder, case.case_id)
    row = by_key[(case.case_id, 'reference')]
    assert float(row['right_ml']) == pytest.approx(truth_sides['right'], abs=1e-4)
    assert float(row['left_ml']) == pytest.approx(truth_sides['left'], abs=1e-4)

  # Table 7: the CoV and ICC written equal metrics.pairwise_agreement on those totals.
  pairs = metrics.pairwise_agreement(totals)
  summary = result.summary
  assert '## Effusion volumes (paper Table 7)' in summary
  assert '## Effusion segmentation (paper Table 6)' in summary
  r1_r2 = pairs[('reader1', 'reader2')]
  assert f'{r1_r2.cov.rms_cov:.2f} / {r1_r2.cov.mean_cov:.2f}' in summary
  assert f'| reader1 vs reader2 | {r1_r2.icc.icc_2_1:.3f} | {r1_r2.icc.icc_3_1:.3f} |' in summary
  model_ref = pairs[('reference', 'model')]
  assert model_ref.difference.mean_abs_difference == 0.0
  figures = os.listdir(os.path.join(out, 'figures'))
  assert sum(n.startswith('bland_altman_') for n in figures) == 6  # 4 raters, 6 pairs
  assert sum(n.startswith('overlay_') for n in figures) == 3


def _phantom_sides(folder, case_id):
  import json

  with open(os.path.join(folder, 'truth', f'{case_id}.json')) as f:
    per_side = json.load(f)['effusion']['per_side']
  return {side: per_side[side]['volume_ml'] for side in ('right', 'left')}
