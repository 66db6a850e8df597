"""The paper command's tables and figures (imask_jax/evaluation/paper/) against plain NumPy.

Tables 3-5 and Figures 6-8: knee phantoms evaluated once per module by the real
`held_out.evaluate_source` with three known predictors standing in for trained models (the
truth shifted one voxel forwards or backwards: 'mask_rcnn' at two "seeds"; the femoral
cartilage grown by one voxel: 'imask'), each written into a workdir's eval/<step>/ as
`python -m imask_jax.evaluate` writes it. Every expected cell is computed here from those
CSVs with NumPy (mean, sample SD over volumes x seeds). Tables 6-7: two hip evaluations'
metrics.csv, ap.csv and volumes.csv written with the report's own CSV writer from known numbers
(Table 7 joined on the case id); expected Dice and mAP@0.5 cells, per-hip means, SDs,
|differences| and CoVs from the definitions; the command refuses evaluations whose cases or
reader volumes differ."""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np
import pytest
from scipy import ndimage

from conftest import experiment_config
from data_pipelines import instances, readers
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.tissues import LabelScheme
from imask_jax import workdir as workdir_lib
from imask_jax.evaluation import held_out, report
from imask_jax.evaluation.paper import command, figures, label_maps, runs
from imask_jax.inference import whole_volume

STEP = 7
TISSUES = ('femur', 'tibia', 'femoral_cartilage', 'tibial_cartilage')  # the paper's order


def _prediction(volume, labels, scheme):
  """A VolumePrediction painting `labels` (canonical), every instance found with score 1."""
  stack = readers.slices(dataclasses.replace(volume, labels=labels))
  class_slices = np.zeros(stack.labels.shape, np.int32)
  for value, class_id in scheme.class_map.items():
    class_slices[stack.labels == value] = class_id
  found = []
  for labels_2d in stack.labels:
    got = instances.extract_instances(labels_2d, scheme.class_map, mode='components')
    row = []
    for c, m in zip(got.classes, got.masks):
      rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
      crop = m[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
      row.append(whole_volume.Instance(int(c), 1.0, int(rows[0]), int(cols[0]), crop))
    found.append(tuple(row))
  return whole_volume.assemble(volume, class_slices, scheme, found)


def _shifted(shift):
  return lambda labels: np.roll(labels, shift, axis=1)


def _grown_femoral_cartilage(labels):
  out = labels.copy()
  out[ndimage.binary_dilation(labels == 2) & (labels == 0)] = 2
  return out


def _evaluated_workdir(base, name, config, source, change):
  workdir = str(base / name)
  os.makedirs(workdir)
  workdir_lib.save_config(config, workdir)
  scheme = LabelScheme.from_config(config)
  header = {
    'workdir': workdir,
    'checkpoint_step': STEP,
    'split': 'test',
    'dataset': str(config.data.dataset),
    'model_kind': 'maskrcnn',
    'mask_head': 'imask' if name.startswith('imask') else 'standard',
    'backbone': 'none',
    'data_dir': str(config.data.data_dir),
    'subject_pattern': '',
    'split_origin': source.origin,
  }
  held_out.evaluate_source(
    config,
    source,
    lambda volume: _prediction(volume, change(volume.labels), scheme),
    held_out.eval_dir(workdir, STEP, 'test', config),
    header,
  )
  return workdir


@pytest.fixture(scope='module')
def knee(tmp_path_factory):
  """{'mask_rcnn': [two workdirs], 'imask': [one]} evaluated on the same 2 knee phantoms."""
  base = tmp_path_factory.mktemp('paper')
  config = experiment_config('phantom_knee', 'smoke')
  config.data.data_dir = str(base / 'tfds')
  config.data.num_volumes = 2
  config.data.split_fractions = (0.0, 0.0, 1.0)
  data_dir = config.data.data_dir
  source = sources.volume_source(params_lib.params_from_config(config, data_dir), data_dir, 'test')
  assert len(source.cases) == 2
  return {
    'mask_rcnn': [
      _evaluated_workdir(base, 'mask_rcnn_seed0', config, source, _shifted(1)),
      _evaluated_workdir(base, 'mask_rcnn_seed1', config, source, _shifted(-1)),
    ],
    'imask': [_evaluated_workdir(base, 'imask', config, source, _grown_femoral_cartilage)],
  }


def _csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _eval_rows(workdirs, name):
  return [r for w in workdirs for r in _csv(os.path.join(w, 'eval', str(STEP), name))]


def _expected(values, digits):
  values = np.asarray(values, float)
  return f'{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}'


def _cells(text, heading):
  """{row label: [cells]} of the Markdown table under `heading`."""
  lines = text.splitlines()
  start = lines.index(heading)
  table = {}
  for line in lines[start + 2 :]:
    if not line.startswith('|'):
      if table:
        break
      continue
    cells = [c.strip() for c in line.strip('|').split('|')]
    if cells[0] not in ('Model', '---') and not set(cells[0]) <= {'-'}:
      table[cells[0]] = cells[1:]
  return table


def _table(number, knee, tmp_path, *extra):
  specs = [f'{name}={w}' for name, ws in knee.items() for w in ws]
  argv = ['--table', str(number), '--out', str(tmp_path)] + [a for s in specs for a in ('--run', s)]
  assert command.main(argv + list(extra)) == 0
  with open(tmp_path / f'table{number}.md', encoding='utf-8') as f:
    return f.read()


@pytest.mark.slow  # the module fixture evaluates 3 runs of 2 knee phantoms (30 s)
def test_table3_cells_are_numpy_over_volumes_and_seeds(knee, tmp_path):
  text = _table(3, knee, tmp_path)
  assert text.index('## As the paper defines its columns') < text.index('## Our 3D figures')
  for heading, column, digits in [
    ('### Dice, 2D per slice', 'dice_2d', 3),
    ('### Hausdorff distance (pixel), 2D per slice', 'hausdorff_2d_px', 2),
    ("### Ave. Hausdorff distance (pixel): ITK's average Hausdorff, 2D per slice",
     'average_hausdorff_2d_px', 3),
    ('### Dice, 3D', 'dice', 3),
    ('### Hausdorff (voxels), 3D', 'hausdorff_voxels', 2),
  ]:  # fmt: skip
    table = _cells(text, heading)
    for name, label in (('mask_rcnn', 'Mask R-CNN'), ('imask', 'iMaskRCNN')):
      rows = _eval_rows(knee[name], 'metrics.csv')
      assert len(rows) == 4 * 2 * len(knee[name])  # tissues x volumes x runs
      want = [
        _expected([float(r[column]) for r in rows if r['tissue'] == t], digits) for t in TISSUES
      ]
      assert table[label] == want, heading
  # Matterport's mAP@0.5 per volume (ap.csv's case rows), and COCO AP over all slices per run.
  cases = {'knee_0000', 'knee_0001'}
  map50 = _cells(
    text, "### Average precision: Matterport's mAP@0.5 per slice, mean ± SD over volumes"
  )
  coco = _cells(text, '### COCO mask AP (IoU 0.50:0.95), all slices of a run; ± over runs')
  rows = _eval_rows(knee['mask_rcnn'], 'ap.csv')
  per_case = [
    [float(r['map50_per_image']) for r in rows if r['tissue'] == t and r['scope'] in cases]
    for t in TISSUES
  ]
  assert map50['Mask R-CNN'] == [_expected(v, 3) for v in per_case]
  pooled = [
    [float(r['ap']) for r in rows if r['tissue'] == t and r['scope'] == 'all'] for t in TISSUES
  ]
  assert all(len(v) == 2 for v in pooled)
  assert coco['Mask R-CNN'] == [_expected(v, 3) for v in pooled]
  # One run: the mean alone (no SD of one value).
  rows = _eval_rows(knee['imask'], 'ap.csv')
  assert coco['iMaskRCNN'] == [
    f'{float(next(r["ap"] for r in rows if r["tissue"] == t and r["scope"] == "all")):.3f}'
    for t in TISSUES
  ]


@pytest.mark.slow
def test_table4_and_table5_side_by_side(knee, tmp_path):
  text = _table(4, knee, tmp_path)
  for name, label in (('mask_rcnn', 'Mask R-CNN'), ('imask', 'iMaskRCNN')):
    rows = _eval_rows(knee[name], 'metrics.csv')
    for tissue in TISSUES:
      own = [r for r in rows if r['tissue'] == tissue]
      abbreviation = ''.join(p[0].upper() for p in tissue.split('_'))
      line = (
        f'| {abbreviation} | truth vs {label} | '
        f'{_expected([float(r["signed_mean_mm"]) for r in own], 2)} | '
        f'{_expected([float(r["signed_sd_mm"]) for r in own], 2)} |'
      )
      assert line in text
  # Growing the femoral cartilage over-estimates it: + in Table 4 (prediction outside).
  grown = [
    r for r in _eval_rows(knee['imask'], 'metrics.csv') if r['tissue'] == 'femoral_cartilage'
  ]
  assert all(float(r['signed_mean_mm']) > 0 for r in grown)

  for convention, sign in (('paper', -1.0), ('ours', 1.0)):
    text = _table(5, knee, tmp_path, '--convention', convention)
    for name, label in (('mask_rcnn', 'Mask R-CNN'), ('imask', 'iMaskRCNN')):
      rows = _eval_rows(knee[name], 'thickness.csv')
      for plate in ('femoral', 'tibial'):
        own = [r for r in rows if r['plate'] == plate]
        assert len(own) == 2 * len(knee[name]) and all(r['status'] == 'ok' for r in own)
        shown = f'GT - {label}' if convention == 'paper' else label
        line = (
          f'| {plate} | {shown} | '
          f'{_expected([sign * float(r["difference_mean_mm"]) for r in own], 2)} | '
          f'{_expected([float(r["difference_sd_mm"]) for r in own], 2)} |'
        )
        assert line in text, line
  # The grown femoral cartilage measures thicker: the paper's GT - P is negative.
  rows = [r for r in _eval_rows(knee['imask'], 'thickness.csv') if r['plate'] == 'femoral']
  assert all(float(r['difference_mean_mm']) > 0 for r in rows)


@pytest.mark.slow
def test_figures_6_to_8_in_the_papers_convention(knee, tmp_path):
  loaded = [
    runs.load_run('mask_rcnn', knee['mask_rcnn'][0]),
    runs.load_run('imask', knee['imask'][0]),
  ]
  maps = label_maps.load_case(loaded, 'knee_0001')
  comparisons = label_maps.thickness_comparisons(maps)
  femoral = comparisons['imask']['femoral']
  # Our difference is prediction - truth; the paper's map is truth - prediction (red = under).
  truth, pred = femoral.truth.thickness_mm, femoral.pred.thickness_mm
  both = np.isfinite(truth) & np.isfinite(pred)
  np.testing.assert_allclose(
    figures.difference_values(femoral, 'paper')[both], (truth - pred)[both]
  )
  np.testing.assert_allclose(figures.difference_values(femoral, 'ours')[both], (pred - truth)[both])
  # The femoral columns in slices: x (mm) along the fitted axis from its centre, / slice spacing.
  shown = figures.femoral_in_slices(femoral.truth, maps.spacing)
  c = femoral.truth.cylinder
  centres = femoral.truth.col_centers
  x_mm = c.center_mm[0] + centres * c.axis[0]
  np.testing.assert_allclose(shown.col_centers, x_mm / maps.spacing[0])
  assert shown.col_name == 'slice' and 0 <= shown.col_centers.min() < shown.col_centers.max() < 64
  # The maps are those evaluate measured: the same mean thickness as its thickness.csv.
  row = next(
    r for r in _csv(os.path.join(knee['imask'][0], 'eval', str(STEP), 'thickness.csv'))
    if r['case_id'] == 'knee_0001' and r['plate'] == 'femoral'
  )  # fmt: skip
  assert femoral.pred.mean_thickness_mm == pytest.approx(float(row['pred_mean_mm']))
  assert femoral.difference.mean_mm == pytest.approx(float(row['difference_mean_mm']))
  for number in (6, 7, 8):
    argv = ['--figure', str(number), '--out', str(tmp_path), '--case', 'knee_0001']
    argv += ['--run', f'mask_rcnn={knee["mask_rcnn"][0]}', '--run', f'imask={knee["imask"][0]}']
    assert command.main(argv) == 0
    assert os.path.getsize(tmp_path / f'figure{number}_knee_0001.png') > 10_000


# --- Table 7: the readers and two models joined on the case id ------------------------------------

# case -> rater -> (right, left) mL; the readers' volumes are the data's, the same in both.
READERS = {
  's1_v1': {'reader1': (7.0, 5.0), 'reader2': (8.0, 6.5)},
  's2_v1': {'reader1': (10.0, 2.0), 'reader2': (9.0, 3.0)},
  's3_v1': {'reader1': (4.0, 6.0), 'reader2': (5.5, 5.0)},
}
MODELS = {
  'mask_rcnn': {'s1_v1': (9.0, 6.0), 's2_v1': (11.0, 4.0), 's3_v1': (6.0, 7.5)},
  'imask': {'s1_v1': (10.5, 8.0), 's2_v1': (12.0, 5.0), 's3_v1': (7.0, 9.0)},
}


DICE_2D = {'mask_rcnn': (0.61, 0.72, 0.55), 'imask': (0.64, 0.70, 0.69)}
MAP50 = {'mask_rcnn': (0.8, 0.9, 0.4), 'imask': (0.75, 0.85, 0.7)}


def _hip_eval(folder, model, cases=tuple(READERS), readers_override=None):
  os.makedirs(folder)
  rows = []
  for case in cases:
    raters = dict(readers_override or READERS[case], model=MODELS[model][case])
    rows += [
      dict(case_id=case, rater=rater, right_ml=right, left_ml=left, total_ml=right + left)
      for rater, (right, left) in raters.items()
    ]
  report.write_csv(os.path.join(folder, 'volumes.csv'), report.VOLUME_COLUMNS, rows)
  # metrics.csv and ap.csv with a known Dice and mAP@0.5 per volume (Table 6).
  metric_rows, ap_rows = [], []
  for k, case in enumerate(cases):
    numbers = {'dice_2d': DICE_2D[model][k], 'dice': DICE_2D[model][k] - 0.05}
    row = {c: numbers.get(c, 0.5) for c in report.METRICS_COLUMNS}
    metric_rows.append(dict(row, case_id=case, tissue='effusion', status='ok'))
    ap_rows.append(dict.fromkeys(report.AP_COLUMNS, 1.0))
    ap_rows[-1].update(scope=case, tissue='effusion', map50_per_image=MAP50[model][k])
  ap_rows.append(dict.fromkeys(report.AP_COLUMNS, 1.0))
  ap_rows[-1].update(scope='all', tissue='effusion', ap=0.25)
  report.write_csv(os.path.join(folder, 'metrics.csv'), report.METRICS_COLUMNS, metric_rows)
  report.write_csv(os.path.join(folder, 'ap.csv'), report.AP_COLUMNS, ap_rows)
  report.write_text(
    os.path.join(folder, 'eval.json'),
    '{"split": "test", "subject_pattern": "(?P<subject>s\\\\d+)_(?P<timepoint>v\\\\d+)"}',
  )
  return str(folder)


def test_table7_four_raters_from_two_evaluations(tmp_path):
  a = _hip_eval(tmp_path / 'a', 'mask_rcnn')
  b = _hip_eval(tmp_path / 'b', 'imask')
  out = tmp_path / 'out'
  assert (
    command.main(
      ['--table', '7', '--run', f'mask_rcnn={a}', '--run', f'imask={b}', '--out', str(out)]
    )
    == 0
  )
  text = (out / 'table7.md').read_text()
  raters = ['reader1', 'reader2', 'Mask R-CNN', 'iMaskRCNN']
  cases = list(READERS)
  sides = {  # rater -> [n_scans, 2]
    'reader1': np.array([READERS[c]['reader1'] for c in cases]),
    'reader2': np.array([READERS[c]['reader2'] for c in cases]),
    'Mask R-CNN': np.array([MODELS['mask_rcnn'][c] for c in cases]),
    'iMaskRCNN': np.array([MODELS['imask'][c] for c in cases]),
  }
  for rater in raters:
    v = sides[rater]
    line = (
      f'| {rater} | {_expected(v[:, 0], 2)} | {_expected(v[:, 1], 2)} | {_expected(v.ravel(), 2)} |'
    )
    assert line in text, line
  hips = {r: sides[r].ravel() for r in raters}  # each scan's right hip, then its left
  for x in raters:
    diffs, covs = [], []
    for y in raters:
      if x == y:
        diffs.append('0')
        covs.append('0')
        continue
      d = np.abs(hips[x] - hips[y])
      diffs.append(_expected(d, 2))
      cov = (d / math.sqrt(2)) / ((hips[x] + hips[y]) / 2)
      covs.append(f'{math.sqrt(np.mean(cov**2)):.2f} / {np.mean(cov):.2f}')
    assert f'| {x} | ' + ' | '.join(diffs) + ' |' in text
    assert f'| {x} | ' + ' | '.join(covs) + ' |' in text
  assert '3 of 3 scans, one per subject' in text


def test_table6_effusion_side_by_side(tmp_path):
  a = _hip_eval(tmp_path / 'a', 'mask_rcnn')
  b = _hip_eval(tmp_path / 'b', 'imask')
  out = tmp_path / 'out'
  argv = ['--table', '6', '--run', f'mask_rcnn={a}', '--run', f'imask={b}', '--out', str(out)]
  assert command.main(argv) == 0
  text = (out / 'table6.md').read_text()
  dice = _cells(text, '### Dice, 2D per slice')
  map50 = _cells(
    text, "### Average precision: Matterport's mAP@0.5 per slice, mean ± SD over volumes"
  )
  for name, label in (('mask_rcnn', 'Mask R-CNN'), ('imask', 'iMaskRCNN')):
    assert dice[label] == [_expected(DICE_2D[name], 3)]
    assert map50[label] == [_expected(MAP50[name], 3)]
    assert _cells(text, '### Dice, 3D')[label] == [_expected(np.subtract(DICE_2D[name], 0.05), 3)]
  # Table 3 is refused on hip evaluations, in one line.
  argv[1] = '3'
  assert command.main(argv) == 2


@pytest.mark.slow
def test_table7_from_real_hip_evaluations(tmp_path):
  """Two hip phantom evaluations by the real evaluate (the truth moved 2 voxels; the truth
  grown by one): the readers and both models per hip, as their volumes.csv holds them."""
  from data_pipelines import tissues
  from imask_jax import configs

  config = configs.default_config()
  config.data.dataset = 'phantom_hip'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.num_volumes = 3
  config.data.split_fractions = (0.0, 0.0, 1.0)
  config.data.plane = 'coronal'
  config.data.class_names = tissues.HIP_CLASSES
  config.data.class_label_values = (1,)
  config.data.instance_mode = 'components'
  data_dir = config.data.data_dir
  source = sources.volume_source(params_lib.params_from_config(config, data_dir), data_dir, 'test')
  scheme = LabelScheme.from_config(config)
  changes = {
    'mask_rcnn': _shifted(2),
    'imask': lambda labels: ndimage.binary_dilation(labels == 1).astype(labels.dtype),
  }
  folders = {}
  for name, change in changes.items():
    folders[name] = str(tmp_path / name / 'eval' / '1')
    header = {'workdir': str(tmp_path / name), 'checkpoint_step': 1, 'split': 'test'}
    header.update(dataset='phantom_hip', mask_head=name, backbone='none', subject_pattern='')
    held_out.evaluate_source(
      config, source, lambda v: _prediction(v, change(v.labels), scheme), folders[name], header
    )
  argv = ['--table', '7', '--out', str(tmp_path / 'out')]
  argv += ['--run', f'mask_rcnn={tmp_path / "mask_rcnn"}', '--run', f'imask={tmp_path / "imask"}']
  assert command.main(argv) == 0
  text = (tmp_path / 'out' / 'table7.md').read_text()
  assert '| Rater | reader1 | reader2 | Mask R-CNN | iMaskRCNN |' in text
  for rater, name, folder in (
    ('reader1', 'reader1', folders['mask_rcnn']),
    ('reader2', 'reader2', folders['imask']),
    ('Mask R-CNN', 'model', folders['mask_rcnn']),
    ('iMaskRCNN', 'model', folders['imask']),
  ):
    rows = [r for r in _csv(os.path.join(folder, 'volumes.csv')) if r['rater'] == name]
    right = np.array([float(r['right_ml']) for r in rows])
    left = np.array([float(r['left_ml']) for r in rows])
    assert len(rows) == 3 and right.sum() + left.sum() > 0
    overall = np.stack([right, left], axis=1).ravel()
    line = f'| {rater} | {_expected(right, 2)} | {_expected(left, 2)} | {_expected(overall, 2)} |'
    assert line in text, line


def test_table7_refuses_evaluations_of_different_cases(tmp_path, capsys):
  a = _hip_eval(tmp_path / 'a', 'mask_rcnn')
  b = _hip_eval(tmp_path / 'b', 'imask', cases=('s1_v1', 's2_v1'))
  argv = [
    '--table',
    '7',
    '--run',
    f'mask_rcnn={a}',
    '--run',
    f'imask={b}',
    '--out',
    str(tmp_path / 'o'),
  ]
  assert command.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'different cases' in err and 's3_v1' in err
  assert not (tmp_path / 'o' / 'table7.md').exists()
  # Same case ids, other data: the readers' volumes differ.
  c = _hip_eval(
    tmp_path / 'c', 'imask', readers_override={'reader1': (1.0, 1.0), 'reader2': (2.0, 2.0)}
  )
  argv = [
    '--table',
    '7',
    '--run',
    f'mask_rcnn={a}',
    '--run',
    f'imask={c}',
    '--out',
    str(tmp_path / 'o'),
  ]
  assert command.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'not evaluated on the same data' in err


def test_a_run_that_was_never_evaluated_is_refused_in_one_line(tmp_path, capsys):
  argv = ['--table', '3', '--run', f'imask={tmp_path}', '--out', str(tmp_path / 'o')]
  assert command.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'python -m imask_jax.evaluate' in err
