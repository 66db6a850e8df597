"""Prediction on new scans: outputs on each input's exact grid, report fields and values, refusal
of outputs that would overwrite inputs, a corrupt input named while the others succeed, and the
regional cartilage thickness against analytic shapes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import POSED_AFFINE
from data_pipelines.phantoms import generate_knee
from imask_jax import errors, metrics
from imask_jax.predict import plan as predict_plan
from imask_jax.predict import scan_report
from imask_jax.predict.command import main as predict_main
from imask_jax.predict.command import predict_command

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Two grids that are neither canonical nor alike: axes P, I, L and axes S, L, P, anisotropic
# voxels, every entry exact in float32 (so a written affine can be compared bit for bit).
AFFINE_A = np.array(
  [[0.0, 0.0, -1.5, 20.0], [-0.5, 0.0, 0.0, 30.0], [0.0, -0.5, 0.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)
AFFINE_B = np.array(
  [[0.0, -0.75, 0.0, 12.5], [0.0, 0.0, -0.75, -8.0], [2.0, 0.0, 0.0, 3.25], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(scope='module')
def scans(tmp_path_factory):
  """A folder with two small knee-like scans (from one phantom) and one corrupt file."""
  folder = tmp_path_factory.mktemp('scans')
  image = generate_knee(2).image  # axes I, P, L
  a = np.transpose(image[40:104, 30:94, 28:36], (1, 0, 2))  # P, I, L: 8 slices of 64 x 64
  # Axes S, L, P after the transpose (slices along L, rows inferior, columns posterior) with
  # the affine B voxel sizes: 6 sagittal slices of 48 x 40.
  b = np.transpose(image[50:98, 40:80, 30:36], (0, 2, 1))[::-1]
  paths = {
    'a': str(folder / 'knee_a.nii.gz'),
    'b': str(folder / 'knee_b_0000.nii.gz'),
    'bad': str(folder / 'broken.nii.gz'),
  }
  nib.save(nib.Nifti1Image(a.astype(np.int16), AFFINE_A), paths['a'])
  nib.save(nib.Nifti1Image(np.ascontiguousarray(b).astype(np.float32), AFFINE_B), paths['b'])
  with open(paths['a'], 'rb') as f:
    truncated = f.read()[:2000]
  with open(paths['bad'], 'wb') as f:
    f.write(truncated)
  with open(folder / 'notes.txt', 'w') as f:
    f.write('not a scan\n')
  return folder, paths


def test_predict_folder_writes_exact_grids_and_reports_and_names_the_corrupt_file(
  scans, smoke_model, tmp_path
):
  folder, paths = scans
  out = tmp_path / 'out'
  stream = io.StringIO()
  status = predict_command(
    smoke_model.workdir, str(folder), str(out), model=smoke_model, stream=stream
  )
  log = stream.getvalue()
  assert status == errors.EXIT_FAILED
  assert f'FAILED DataError: {paths["bad"]}: cannot read' in log
  assert 'skipped notes.txt' in log
  assert '2 of 3 volumes written' in log
  assert sorted(os.listdir(out)) == [
    'knee_a.json',
    'knee_a.nii.gz',
    'knee_b.json',
    'knee_b.nii.gz',
  ]  # no temporaries, nothing for 'broken'

  for name, key in (('knee_a', 'a'), ('knee_b', 'b')):
    source = nib.load(paths[key])
    written = nib.load(str(out / f'{name}.nii.gz'))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    with open(out / f'{name}.json') as f:
      report = json.load(f)
    assert report['input'] == paths[key]
    assert report['label_map'] == str(out / f'{name}.nii.gz')
    assert report['checkpoint_step'] == smoke_model.step
    assert report['shape'] == list(source.shape)
    # The scan's in-plane pixel and the one the network ran at (the smoke config's 1.6 mm,
    # up to the rounding of the resampled size to whole pixels).
    zooms = {round(float(z), 4) for z in source.header.get_zooms()[:3]}
    assert {round(mm, 4) for mm in report['slice_pixel_spacing_mm']} <= zooms
    target = float(smoke_model.config.data.pixel_spacing_mm)
    assert report['network_pixel_spacing_mm'] == pytest.approx([target, target], rel=0.03)
    assert report['resampling'] == f'scale-true at {target:g} mm'
    assert all(n % 64 == 0 for n in report['network_input_size'])
    assert report['labels'] == {
      'femur': 1,
      'femoral_cartilage': 2,
      'tibia': 3,
      'tibial_cartilage': 4,
    }
    voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000
    for tissue, value in report['labels'].items():
      assert report['volumes_ml'][tissue] == pytest.approx(
        np.count_nonzero(labels == value) * voxel_ml, rel=1e-9
      )
    thickness = report['cartilage_thickness']
    for plate in ('femoral', 'tibial'):
      assert thickness[plate]['status'] in ('measured', 'not_measured')
      if thickness[plate]['status'] == 'measured':
        assert thickness[plate]['mean_mm'] > 0
      else:
        assert thickness[plate]['reason']
    assert 'effusion_ml' not in report


@pytest.mark.slow
def test_output_equal_to_an_input_is_refused(scans, tmp_path):
  folder, paths = scans
  before = os.path.getmtime(paths['a']), os.path.getsize(paths['a'])
  stream = io.StringIO()
  # Refused before the model is needed: the workdir is never read.
  assert (
    predict_command('/nonexistent', paths['a'], paths['a'], stream=stream) == errors.EXIT_REFUSED
  )
  assert f'output {paths["a"]} is the input {paths["a"]}' in stream.getvalue()
  assert (os.path.getmtime(paths['a']), os.path.getsize(paths['a'])) == before
  stream = io.StringIO()
  assert (
    predict_command('/nonexistent', str(folder), str(folder), stream=stream) == errors.EXIT_REFUSED
  )
  assert 'is the input folder' in stream.getvalue()
  # The CLI entry point gives the same status.
  assert (
    predict_main(['--workdir', '/nonexistent', '--input', paths['a'], '--output', paths['a']])
    == errors.EXIT_REFUSED
  )


def test_plan_names_outputs_like_nnunet_and_refuses_collisions(tmp_path):
  inputs = [str(tmp_path / 'x_0000.nii.gz'), str(tmp_path / 'y.nii')]
  for path in inputs:
    open(path, 'w').close()
  jobs = predict_plan.plan_jobs(str(tmp_path), inputs, str(tmp_path / 'out'))
  assert [(os.path.basename(j.label_map), os.path.basename(j.report)) for j in jobs] == [
    ('x.nii.gz', 'x.json'),
    ('y.nii.gz', 'y.json'),
  ]
  single = predict_plan.plan_jobs(inputs[0], inputs[:1], str(tmp_path / 'o' / 'seg.nii.gz'))
  assert single[0].report == str(tmp_path / 'o' / 'seg.json')
  clash = [str(tmp_path / 'x_0000.nii.gz'), str(tmp_path / 'x.nii.gz')]
  with pytest.raises(ValueError, match='would both write'):
    predict_plan.plan_jobs(str(tmp_path), clash, str(tmp_path / 'out'))


# --- never overwrite what predict did not write; refuse an unwritable output up front ----------


def _scan(path, value=0.0) -> str:
  nib.save(nib.Nifti1Image(np.full((6, 5, 4), value, np.float32), POSED_AFFINE), str(path))
  return str(path)


def _bytes(path) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def test_a_neighbour_named_like_the_prediction_is_refused_not_overwritten(tmp_path):
  # Issue 15.1: input scan_0000.nii.gz, --output its own folder, and another scan there whose
  # name is the prediction's (scan.nii.gz). It was replaced by the label map with exit 0.
  source = _scan(tmp_path / 'scan_0000.nii.gz', 1.0)
  neighbour = _scan(tmp_path / 'scan.nii.gz', 7.0)
  before = _bytes(neighbour)
  stream = io.StringIO()
  # Refused before the model is needed: the workdir is never read.
  status = predict_command('/nonexistent', source, str(tmp_path), stream=stream)
  assert status == errors.EXIT_REFUSED
  assert (
    f'output {neighbour} exists and is not an earlier prediction of {source}' in stream.getvalue()
  )
  assert '--overwrite' in stream.getvalue()
  assert _bytes(neighbour) == before
  assert sorted(os.listdir(tmp_path)) == ['scan.nii.gz', 'scan_0000.nii.gz']
  # A stray JSON file with the report's name is not predict's either.
  os.remove(neighbour)
  (tmp_path / 'scan.json').write_text('{"note": "my own file"}\n')
  stream = io.StringIO()
  assert (
    predict_command('/nonexistent', source, str(tmp_path), stream=stream) == errors.EXIT_REFUSED
  )
  assert f'output {tmp_path / "scan.json"} exists' in stream.getvalue()
  assert (tmp_path / 'scan.json').read_text() == '{"note": "my own file"}\n'


def test_earlier_predictions_are_replaced_others_need_overwrite(smoke_model, tmp_path):
  source = _scan(tmp_path / 'scan_0000.nii.gz', 1.0)
  out = tmp_path / 'out'
  assert (
    predict_command(smoke_model.workdir, source, str(out), model=smoke_model, stream=io.StringIO())
    == errors.EXIT_OK
  )
  report = json.loads((out / 'scan.json').read_text())
  assert report['input'] == source and report['label_map'] == str(out / 'scan.nii.gz')
  # A second run over its own earlier prediction replaces it.
  assert (
    predict_command(smoke_model.workdir, source, str(out), model=smoke_model, stream=io.StringIO())
    == errors.EXIT_OK
  )
  # The same names, but a report of another input: not this scan's prediction.
  other = _scan(tmp_path / 'other.nii.gz', 2.0)
  report['input'] = other
  (out / 'scan.json').write_text(json.dumps(report))
  label_before = _bytes(out / 'scan.nii.gz')
  stream = io.StringIO()
  assert (
    predict_command(smoke_model.workdir, source, str(out), model=smoke_model, stream=stream)
    == errors.EXIT_REFUSED
  )
  assert 'is not an earlier prediction' in stream.getvalue()
  assert _bytes(out / 'scan.nii.gz') == label_before
  # --overwrite replaces it.
  assert (
    predict_command(
      smoke_model.workdir, source, str(out), model=smoke_model, overwrite=True, stream=io.StringIO()
    )
    == errors.EXIT_OK
  )
  assert json.loads((out / 'scan.json').read_text())['input'] == source
  # The flag never lets an input be replaced (refused before the workdir is read).
  assert (
    predict_main(
      ['--workdir', '/nonexistent', '--input', source, '--output', source, '--overwrite']
    )
    == errors.EXIT_REFUSED
  )


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
  # Issue 15.4: --output under a regular file segmented every scan, then failed each one.
  source = _scan(tmp_path / 'scan.nii.gz')
  blocker = tmp_path / 'results'
  blocker.write_text('a file, not a folder\n')
  for output in (blocker / 'out', blocker / 'out' / 'seg.nii.gz'):
    stream = io.StringIO()
    # '/nonexistent' as the workdir: no model is loaded before the refusal.
    assert (
      predict_command('/nonexistent', source, str(output), stream=stream) == errors.EXIT_REFUSED
    )
    assert (
      f'predict: refused: --output {blocker / "out"}: cannot create the output folder, '
      f'{blocker} is a file' in stream.getvalue()
    )
  assert blocker.read_text() == 'a file, not a folder\n'
  # A folder that is created but the model then fails to load is removed again.
  stream = io.StringIO()
  assert (
    predict_command(
      str(tmp_path / 'no_workdir'), source, str(tmp_path / 'new' / 'out'), stream=stream
    )
    == errors.EXIT_REFUSED
  )
  assert stream.getvalue() == (
    f'predict: refused: NotAWorkdirError: '
    f'{tmp_path / "no_workdir" / "config.json"}: no config.json in the '
    f"workdir; is '{tmp_path / 'no_workdir'}' a training workdir (made "
    'by python -m imask_jax.main)?\n'
  )
  assert not (tmp_path / 'new').exists()


def test_the_temporary_of_a_killed_predict_is_removed_by_the_next_run(smoke_model, tmp_path):
  # Issue 15.6: a run killed mid-write (SIGKILL) leaves the hidden temporary of its label map.
  source = _scan(tmp_path / 'scan.nii.gz', 1.0)
  out = tmp_path / 'out'
  out.mkdir()
  killed = subprocess.run(
    [
      sys.executable,
      '-c',
      'import os, signal, sys\n'
      'from data_pipelines.atomic import atomic_path\n'
      'writer = atomic_path(sys.argv[1])\n'
      'tmp = writer.__enter__()\n'
      'open(tmp, "wb").write(b"half a label map")\n'
      'os.kill(os.getpid(), signal.SIGKILL)\n',
      str(out / 'scan.nii.gz'),
    ],
    cwd=REPO,
    check=False,
  )
  assert killed.returncode == -signal.SIGKILL
  (leftover,) = os.listdir(out)
  assert leftover.startswith('.scan.nii.gz.') and leftover.endswith('.tmp.nii.gz')
  (out / '.scan.nii.gz.notes').write_text('not ours\n')  # another naming: kept
  stream = io.StringIO()
  assert (
    predict_command(smoke_model.workdir, source, str(out), model=smoke_model, stream=stream)
    == errors.EXIT_OK
  )
  assert f'removed {out / leftover}' in stream.getvalue()
  assert sorted(os.listdir(out)) == ['.scan.nii.gz.notes', 'scan.json', 'scan.nii.gz']


# --- regional thickness on analytic shapes -------------------------------------------------------


def test_tibial_regions_of_a_flat_plate_are_exact():
  # Canonical [X (right), Y (anterior), Z (superior)]: bone below, a cartilage layer 4 voxels
  # thick over the whole plateau (it reaches the array's sides, so there is no rim).
  spacing = (0.5, 0.5, 0.7)
  labels = np.zeros((20, 16, 12), np.uint8)
  labels[:, :, :4] = 3
  labels[:, :, 4:8] = 4
  report = scan_report.tibial_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')
  assert report['status'] == 'measured'
  assert report['mean_mm'] == pytest.approx(4 * 0.7)
  assert report['regions_mm'] == {'right': pytest.approx(2.8), 'left': pytest.approx(2.8)}
  labels[:, :, 4:8] = 0
  missing = scan_report.tibial_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')
  assert missing['status'] == 'not_measured'


def test_the_normal_method_reads_an_oblique_plate_true_where_the_nearest_reads_it_low():
  # A 2 mm plate (measured along its normal) tilted off every axis at 0.5 mm voxels: the
  # nearest-surface measure reads the staircase about 5 % low (docs/results/thickness_measure.md),
  # the surface-normal one reads the plate's own thickness.
  spacing = (0.5, 0.5, 0.5)
  shape = (48, 48, 32)
  x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing='ij')
  normal = np.array([0.21, 0.13, 1.0]) / np.linalg.norm([0.21, 0.13, 1.0])
  height = (x - 12) * normal[0] + (y - 12) * normal[1] + (z - 6.3) * normal[2]
  labels = np.zeros(shape, np.uint8)
  labels[height < 0] = 3
  labels[(height >= 0) & (height < 2.0)] = 4
  knee = metrics.KneeLabelValues()
  nearest = scan_report.tibial_thickness(labels, spacing, knee, 'nearest')['mean_mm']
  surface_normal = scan_report.tibial_thickness(labels, spacing, knee, 'normal')['mean_mm']
  assert surface_normal == pytest.approx(2.0, abs=0.02)
  assert nearest == pytest.approx(1.9, abs=0.03)


def _femur_with_shell(angle_range, right_thickness=2.0):
  """A femur-like cylinder along X (radius 12 mm, through the whole array, so no rim in X)
  under a cartilage shell covering angles in `angle_range` (deg; 0 inferior, +90 anterior),
  2 mm thick on the patient's left half (x < 12 mm) and `right_thickness` on the right half.
  Canonical [X, Y, Z] label map and spacing."""
  spacing = (1.0, 0.4, 0.4)
  shape = (24, 80, 80)
  x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing='ij')
  dy, dz = y - 16.0, z - 16.0
  radius = np.hypot(dy, dz)
  angle = np.degrees(np.arctan2(dy, -dz))
  outer = 12.0 + np.where(x < 12.0, 2.0, right_thickness)
  labels = np.zeros(shape, np.uint8)
  labels[radius < 12.0] = 1
  labels[
    (radius >= 12.0) & (radius < outer) & (angle > angle_range[0]) & (angle < angle_range[1])
  ] = 2
  return labels, spacing


def test_femoral_regions_of_a_cylindrical_shell():
  # Shell over -150..150 deg: the central band holds no rim (thickness tapers within one
  # thickness of a rim, by the minimal-distance definition), so it reads the shell's 2 mm.
  labels, spacing = _femur_with_shell((-150, 150))
  report = scan_report.femoral_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')
  assert report['status'] == 'measured'
  assert report['cylinder_radius_mm'] == pytest.approx(12.0, abs=0.2)
  regions = report['regions_mm']
  for side in ('left', 'right'):
    assert regions[f'central_{side}'] == pytest.approx(2.0, abs=0.15)
    assert regions[f'anterior_{side}'] is not None and regions[f'posterior_{side}'] is not None
  # 3 mm on the patient's right half: the right regions read it (less within about a
  # thickness of the step between the halves, the minimal-distance taper again).
  labels, spacing = _femur_with_shell((-150, 150), right_thickness=3.0)
  regions = scan_report.femoral_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')[
    'regions_mm'
  ]
  assert regions['central_left'] == pytest.approx(2.0, abs=0.15)
  assert regions['central_right'] == pytest.approx(3.0, abs=0.25)
  # Shell over 50..150 deg only: nothing in the central and posterior bands.
  labels, spacing = _femur_with_shell((50, 150))
  regions = scan_report.femoral_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')[
    'regions_mm'
  ]
  for side in ('left', 'right'):
    assert regions[f'central_{side}'] is None and regions[f'posterior_{side}'] is None
    assert regions[f'anterior_{side}'] == pytest.approx(2.0, abs=0.5)
  # No cartilage on the femur: reported as not measured, with the reason.
  labels[labels == 2] = 0
  missing = scan_report.femoral_thickness(labels, spacing, metrics.KneeLabelValues(), 'nearest')
  assert missing['status'] == 'not_measured' and 'at least 6' in missing['reason']


def test_a_scan_that_lost_its_pose_is_refused_unless_allowed(smoke_model, tmp_path):
  # An identity affine (a converter that dropped the DICOM orientation): which axis is
  # sagittal is unknown, so the scan fails alone, naming the file, until the user says so.
  source = tmp_path / 'lost.nii.gz'
  nib.save(nib.Nifti1Image(np.full((6, 5, 4), 1.0, np.float32), np.eye(4)), str(source))
  stream = io.StringIO()
  status = predict_command(
    smoke_model.workdir, str(source), str(tmp_path / 'out'), model=smoke_model, stream=stream
  )
  assert status == errors.EXIT_FAILED
  assert f'{source}: image has no scanner pose: the affine is the identity' in stream.getvalue()
  assert not (tmp_path / 'out' / 'lost.nii.gz').exists()
  status = predict_command(
    smoke_model.workdir,
    str(source),
    str(tmp_path / 'out'),
    model=smoke_model,
    stream=io.StringIO(),
    allow_missing_pose=True,
  )
  assert status == errors.EXIT_OK
  assert nib.load(tmp_path / 'out' / 'lost.nii.gz').shape == (6, 5, 4)
  assert not smoke_model.config.data.allow_missing_pose  # the shared model is untouched


def test_the_report_says_which_knee_and_why(smoke_model, tmp_path):
  """The "side" block: a sidecar's declaration, nothing declared, a sidecar that contradicts
  itself (flagged, not failed), --side over all of them, and a DICOM series description."""
  from test_dicom import write_series

  scans = tmp_path / 'scans'
  scans.mkdir()
  knee = np.transpose(generate_knee(2).image[40:104, 30:94, 28:36], (1, 0, 2)).astype(np.int16)
  sidecars = {
    'declared': {'SeriesDescription': 'SAG_3D_DESS_LEFT'},
    'plain': None,
    'conflict': {'side': 'right', 'SeriesDescription': 'SAG_3D_DESS_LEFT'},
  }
  for name, sidecar in sidecars.items():
    nib.save(nib.Nifti1Image(knee, AFFINE_A), str(scans / f'{name}.nii.gz'))
    if sidecar is not None:
      (scans / f'{name}.json').write_text(json.dumps(sidecar))

  def run(source, out, **kwargs):
    status = predict_command(
      smoke_model.workdir, str(source), str(out), model=smoke_model, stream=io.StringIO(), **kwargs
    )
    assert status == errors.EXIT_OK
    return {
      name: json.loads(path.read_text())
      for name, path in ((p.name[: -len('.json')], p) for p in out.glob('*.json'))
    }

  def check_rules(side, codes):
    # Whatever the smoke model paints: the rules of quality.py hold on the block.
    assert side['side'] == (side['declared'] or side['estimated'])
    assert ('side_unknown' in codes) == (side['side'] is None)
    disagree = bool(
      side['declared'] and side['estimated'] and side['declared'] != side['estimated']
    )
    assert ('side_disagrees' in codes) == disagree
    assert ('side_conflict' in codes) == (side['conflict'] is not None)

  reports = run(scans, tmp_path / 'out')
  assert sorted(reports) == ['conflict', 'declared', 'plain']
  sides = {name: report['side'] for name, report in reports.items()}
  for name, report in reports.items():
    check_rules(sides[name], [f['code'] for f in report['quality']['flags']])
    assert set(sides[name]) >= {'side', 'basis', 'declared', 'estimated', 'estimate_basis'}
  assert sides['declared']['declared'] == sides['declared']['side'] == 'left'
  assert sides['declared']['basis'] == (
    'declared: sidecar declared.json "SeriesDescription": \'SAG_3D_DESS_LEFT\''
  )
  assert sides['plain']['declared'] is None
  assert 'nothing declared: no --side, no sidecar plain.json' in sides['plain']['basis']
  assert sides['conflict']['declared'] is None
  assert sides['conflict']['conflict'] == (
    'sidecar conflict.json "side": \'right\' says right, but sidecar conflict.json '
    '"SeriesDescription": \'SAG_3D_DESS_LEFT\' says left; give the side with --side left|right'
  )
  # --side, for every input of the run, over what the scans declare.
  flagged = run(scans, tmp_path / 'flagged', side='right')
  for report in flagged.values():
    side = report['side']
    assert side['side'] == side['declared'] == 'right' and side['conflict'] is None
    check_rules(side, [f['code'] for f in report['quality']['flags']])
  assert flagged['plain']['side']['basis'] == 'declared: --side right'
  assert flagged['declared']['side']['basis'] == (
    'declared: --side right (overrides sidecar declared.json "SeriesDescription": '
    "'SAG_3D_DESS_LEFT', which says left)"
  )
  # A DICOM series as OAI describes it.
  series = write_series(
    tmp_path / 'study' / 'knee_0001',
    knee,
    AFFINE_A,
    tags=lambda k: (('0008|103e', 'SAG_3D_DESS_RIGHT'),),
  )
  (report,) = run(series, tmp_path / 'dicom').values()
  assert report['side']['declared'] == 'right'
  assert report['side']['basis'].startswith(
    "declared: DICOM SeriesDescription (0008,103E) 'SAG_3D_DESS_RIGHT' in "
  )
  # A --side that is not a side is refused before any work.
  stream = io.StringIO()
  status = predict_command(
    smoke_model.workdir,
    str(scans),
    str(tmp_path / 'x'),
    model=smoke_model,
    stream=stream,
    side='up',
  )
  assert status == errors.EXIT_REFUSED
  assert stream.getvalue() == "predict: refused: --side 'up': expected left or right\n"
  assert not (tmp_path / 'x').exists()
