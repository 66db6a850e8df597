"""Prediction on cohorts (issue 16): the pipelined run (read ahead, write behind) gives the files
of the sequential one and keeps its order, bounds and failure isolation; `--shard K/N` splits
the plan into disjoint shares that together are the whole plan; malformed shards are refused."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import POSED_AFFINE
from data_pipelines import nifti_io
from data_pipelines.phantoms import generate_knee
from imask_jax import errors
from imask_jax.predict import plan as predict_plan
from imask_jax.predict import stages as predict_stages
from imask_jax.predict.command import main as predict_main
from imask_jax.predict.command import predict_command

# Axes P, I, L with anisotropic voxels (as in tests/predict/test_predict_command.py).
AFFINE = np.array(
  [[0.0, 0.0, -1.5, 20.0], [-0.5, 0.0, 0.0, 30.0], [0.0, -0.5, 0.0, 40.0], [0.0, 0.0, 0.0, 1.0]]
)
NAMES = ['knee_1', 'knee_2', 'knee_3_broken', 'knee_4', 'knee_5']


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  """A folder of four small knee scans (8 slices of 64 x 64, cut from one phantom at different
  places) and, third in sorted order, a truncated one."""
  folder = tmp_path_factory.mktemp('cohort')
  image = generate_knee(2).image  # axes I, P, L
  for i, name in enumerate(n for n in NAMES if 'broken' not in n):
    crop = image[36 + 4 * i : 100 + 4 * i, 30:94, 24 + 3 * i : 32 + 3 * i]
    data = np.transpose(crop, (1, 0, 2)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, AFFINE), str(folder / f'{name}.nii.gz'))
  with open(folder / 'knee_1.nii.gz', 'rb') as f:
    truncated = f.read()[:2000]
  (folder / 'knee_3_broken.nii.gz').write_bytes(truncated)
  return folder


def _files(folder) -> dict[str, bytes]:
  return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def _progress(log: str) -> list[str]:
  """The scan names of the progress lines, in the order printed."""
  return re.findall(r'\] \d+/\d+ (\S+)', log)


# --- shards ------------------------------------------------------------------------------------


def test_shards_partition_the_plan_exactly(tmp_path):
  # Inputs created in shuffled order: the plan (and so every shard) follows the sorted names.
  names = [f'scan_{i:02d}.nii.gz' for i in range(11)]
  for i in np.random.default_rng(0).permutation(len(names)):
    (tmp_path / names[i]).write_bytes(b'')
  inputs, _ = predict_plan.list_inputs(str(tmp_path))
  plan = predict_plan.plan_jobs(str(tmp_path), inputs, str(tmp_path / 'out'))
  assert [os.path.basename(j.input) for j in plan] == names
  for size in range(len(plan) + 1):
    jobs = plan[:size]
    for n in range(1, 8):
      shards = [predict_plan.shard_jobs(jobs, (k, n)) for k in range(n)]
      # deterministic
      assert shards == [predict_plan.shard_jobs(list(jobs), (k, n)) for k in range(n)]
      flat = [j.input for shard in shards for j in shard]
      assert sorted(flat) == sorted(j.input for j in jobs)  # union is the plan, no job twice
      assert len(set(flat)) == len(flat)
      assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
      for k, shard in enumerate(shards):
        assert shard == [j for i, j in enumerate(jobs) if i % n == k]
  assert predict_plan.shard_jobs(plan, None) == plan


@pytest.mark.parametrize(
  'text', ['2/2', '3/2', '1', '1/0', '0/0', '-1/2', 'a/b', '0/2/3', '', '0.5/2', '1/-2', 'one/2']
)
def test_a_malformed_shard_is_refused_in_one_line_with_exit_2(text, tmp_path, capsys):
  source = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), POSED_AFFINE), str(source))
  argv = ['--workdir', '/nonexistent', '--input', str(source), '--output', str(tmp_path / 'o')]
  assert predict_main([*argv, f'--shard={text}']) == errors.EXIT_REFUSED
  err = capsys.readouterr().err
  assert err == (
    f'predict: refused: --shard {text!r}: expected K/N with 0 <= K < N (K counts from 0: the '
    'shards of N=2 are 0/2 and 1/2)\n'
  )
  assert sorted(os.listdir(tmp_path)) == ['scan.nii.gz']  # nothing created
  with pytest.raises(ValueError, match='expected K/N'):
    predict_plan.parse_shard(text)


def test_well_formed_shards_parse_and_a_bad_tuple_is_refused(tmp_path):
  assert predict_plan.parse_shard('0/1') == (0, 1)
  assert predict_plan.parse_shard('1/2') == (1, 2)
  assert predict_plan.parse_shard('9/10') == (9, 10)
  source = tmp_path / 'scan.nii.gz'
  nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), POSED_AFFINE), str(source))
  stream = io.StringIO()
  status = predict_command(
    '/nonexistent', str(source), str(tmp_path / 'o'), shard=(2, 2), stream=stream
  )
  assert status == errors.EXIT_REFUSED
  assert stream.getvalue().startswith("predict: refused: --shard '2/2': expected K/N")


# --- the pipeline's order, overlap and bounds (fake stages, no model) -------------------------


class FakeStages:
  """read/segment/write stand-ins that log their start and end, fail where told, and make each
  segmentation wait until the next read and the previous write have started (so the test
  proves the overlap instead of hoping for it)."""

  def __init__(self, bad_read=(), bad_write=()):
    self.bad_read, self.bad_write = set(bad_read), set(bad_write)
    self.lock = threading.Lock()
    self.events: list[tuple[str, str, int]] = []
    self.started: dict[tuple[str, int], threading.Event] = {}
    self.threads: dict[str, set[str]] = {'read': set(), 'segment': set(), 'write': set()}

  def _log(self, what, stage, i):
    with self.lock:
      self.events.append((what, stage, i))
      self.threads[stage].add(threading.current_thread().name)
      if what == 'start':
        self.started.setdefault((stage, i), threading.Event()).set()

  def _wait_started(self, stage, i):
    with self.lock:
      event = self.started.setdefault((stage, i), threading.Event())
    assert event.wait(10), f'{stage} of scan {i} did not start during a segmentation'

  def read(self, model, job):
    i = int(job.input)
    self._log('start', 'read', i)
    time.sleep(0.01)
    self._log('end', 'read', i)
    if i in self.bad_read:
      raise ValueError(f'{job.input}: cannot read')
    return i

  def segment(self, model, i):
    self._log('start', 'segment', i)
    if i + 1 < model['count']:
      self._wait_started('read', i + 1)
    if i - 1 >= 0 and i - 1 not in self.bad_read:
      self._wait_started('write', i - 1)
    self._log('end', 'segment', i)
    return i

  def write(self, model, i, reference):
    self._log('start', 'write', i)
    time.sleep(0.01)
    self._log('end', 'write', i)
    if i in self.bad_write:
      raise OSError('disk full')
    return predict_stages.Outcome(model['jobs'][i], {'scan': i})


def _fake_run(monkeypatch, count, **fails):
  stages = FakeStages(**fails)
  monkeypatch.setattr(predict_stages, 'read_scan', stages.read)
  monkeypatch.setattr(predict_stages, 'segment_scan', stages.segment)
  monkeypatch.setattr(predict_stages, 'write_scan', stages.write)
  jobs = [predict_plan.Job(str(i), f'{i}.nii.gz', f'{i}.json') for i in range(count)]
  model = {'count': count, 'jobs': jobs}
  outcomes = list(predict_stages.run_pipelined(model, jobs))
  return stages, jobs, outcomes


def test_the_pipeline_overlaps_read_segment_and_write_in_order_and_bounded(monkeypatch):
  stages, jobs, outcomes = _fake_run(monkeypatch, 6)
  assert [o.job for o in outcomes] == jobs  # in job order
  assert [o.report for o in outcomes] == [{'scan': i} for i in range(6)]
  # Segmentation in this thread, reads and writes in one background thread each.
  assert stages.threads['segment'] == {threading.current_thread().name}
  assert len(stages.threads['read']) == len(stages.threads['write']) == 1
  assert stages.threads['read'].isdisjoint(stages.threads['write'] | stages.threads['segment'])
  position = {event: n for n, event in enumerate(stages.events)}
  for i in range(6):
    # At most one scan read ahead: scan i+2 is read only after scan i is segmented.
    if i + 2 < 6:
      assert position[('start', 'read', i + 2)] > position[('end', 'segment', i)]
    # At most one write pending: scan i's write starts after scan i-1's has ended, and after
    # scan i is segmented.
    if i >= 1:
      assert position[('start', 'write', i)] > position[('end', 'write', i - 1)]
    assert position[('start', 'write', i)] > position[('end', 'segment', i)]


def test_a_failed_read_or_write_in_the_pipeline_fails_alone(monkeypatch):
  stages, jobs, outcomes = _fake_run(monkeypatch, 5, bad_read=[2], bad_write=[3])
  assert [o.job for o in outcomes] == jobs
  assert [o.report for o in outcomes] == [{'scan': 0}, {'scan': 1}, None, None, {'scan': 4}]
  assert outcomes[2].error == 'ValueError: 2: cannot read'
  assert outcomes[3].error == 'OSError: 3: disk full'
  assert ('start', 'segment', 2) not in stages.events  # a scan that was not read is not segmented
  assert ('start', 'write', 4) in stages.events


# --- real runs with the smoke-trained model ---------------------------------------------------


def test_pipelined_shards_and_sequential_write_the_same_files_and_a_corrupt_scan_fails_alone(
  cohort, smoke_model, tmp_path
):
  runs = {}
  for mode, pipeline in (('sequential', False), ('pipelined', True)):
    out = tmp_path / mode
    stream = io.StringIO()
    status = predict_command(
      smoke_model.workdir,
      str(cohort),
      str(out),
      model=smoke_model,
      stream=stream,
      pipeline=pipeline,
    )
    log = stream.getvalue()
    assert status == errors.EXIT_FAILED, log
    bad = str(cohort / 'knee_3_broken.nii.gz')
    assert f'predict: FAILED DataError: {bad}: cannot read' in log
    assert '4 of 5 volumes written' in log
    # Progress lines in job order; the ones before and after the corrupt scan are written.
    assert _progress(log) == [f'{n}.nii.gz' for n in NAMES]
    assert sorted(os.listdir(out)) == sorted(
      f'{n}{ext}' for n in NAMES if 'broken' not in n for ext in ('.json', '.nii.gz')
    )  # nothing for the broken scan, no temporaries
    runs[mode] = out

  # Byte-identical label maps; reports equal but for where the label map was written.
  seq, pipe = _files(runs['sequential']), _files(runs['pipelined'])
  assert seq.keys() == pipe.keys()
  for name in seq:
    if name.endswith('.nii.gz'):
      assert seq[name] == pipe[name], name
      assert nifti_io.is_nifti_path(name)
    else:
      a, b = json.loads(seq[name]), json.loads(pipe[name])
      assert a.pop('label_map') == str(runs['sequential'] / name.replace('.json', '.nii.gz'))
      assert b.pop('label_map') == str(runs['pipelined'] / name.replace('.json', '.nii.gz'))
      assert a == b, name

  # Three shards, one after another into one folder: each writes only its own scans (a shard
  # that starts after the others have written accepts their files as earlier predictions) and
  # together they write the pipelined run's files, each once.
  out = tmp_path / 'sharded'
  plan = [f'{n}.nii.gz' for n in NAMES]
  seen: set[str] = set()
  for k in range(3):
    before = _files(out) if out.exists() else {}
    stream = io.StringIO()
    status = predict_command(
      smoke_model.workdir, str(cohort), str(out), model=smoke_model, stream=stream, shard=(k, 3)
    )
    mine = plan[k::3]
    assert status == (errors.EXIT_FAILED if 'knee_3_broken.nii.gz' in mine else 0)
    assert f'predict: shard {k}/3: {len(mine)} of the 5 scans' in stream.getvalue()
    assert _progress(stream.getvalue()) == mine
    after = _files(out)
    new = {n for n in after if n not in before or after[n] != before[n]}
    expected = {
      n.replace('.nii.gz', ext) for n in mine if 'broken' not in n for ext in ('.json', '.nii.gz')
    }
    assert new == expected
    assert not new & seen
    seen |= new
  sharded = _files(out)
  assert sharded.keys() == pipe.keys()
  for name in sharded:
    if name.endswith('.nii.gz'):
      assert sharded[name] == pipe[name], name


def test_a_label_map_that_cannot_be_written_fails_alone_and_leaves_its_report_as_it_was(
  cohort, smoke_model, tmp_path, monkeypatch
):
  out = tmp_path / 'out'
  out.mkdir()
  # An earlier prediction of knee_4: its report must come back unchanged.
  earlier = {'input': str(cohort / 'knee_4.nii.gz'), 'label_map': str(out / 'knee_4.nii.gz')}
  (out / 'knee_4.json').write_text(json.dumps(earlier))
  save = nifti_io.save_nifti

  def failing_save(array, affine, path, like=None):
    if os.path.basename(path) in ('knee_2.nii.gz', 'knee_4.nii.gz'):
      raise OSError(28, 'No space left on device')
    return save(array, affine, path, like=like)

  monkeypatch.setattr(nifti_io, 'save_nifti', failing_save)
  stream = io.StringIO()
  status = predict_command(
    smoke_model.workdir, str(cohort), str(out), model=smoke_model, stream=stream
  )
  log = stream.getvalue()
  assert status == errors.EXIT_FAILED
  for name in ('knee_2', 'knee_4'):
    assert f'FAILED OSError: {cohort / name}.nii.gz: [Errno 28] No space left on device' in log
  assert sorted(os.listdir(out)) == [
    'knee_1.json',
    'knee_1.nii.gz',
    'knee_4.json',
    'knee_5.json',
    'knee_5.nii.gz',
  ]
  assert json.loads((out / 'knee_4.json').read_text()) == earlier
  # A report without its label map (what another shard may see mid-write) is an earlier
  # prediction: a late shard does not refuse it.
  predict_plan.check_overwrites(
    [predict_plan.Job(earlier['input'], earlier['label_map'], str(out / 'knee_4.json'))]
  )
