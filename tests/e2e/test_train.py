"""The training job end to end on the knee smoke config (5 phantoms, 64 x 64, 6 steps).

The reference is the session's `smoke_workdir` (conftest: one in-process, one-device run).
Against it: a run of the same config in a subprocess, killed with SIGKILL after its first
checkpoint and restarted (the same loss curve and, bit for bit, the same parameters); a
2-device run (the same to float tolerance, and its checkpoint restored onto 1 device); two
processes on loopback (the same). Plus: logs, checkpoint preservation, non-finite steps, the
schedule and the missing-data message.

Time: the 2-device run and the two-process pair compile programs of their own, so they start
in the background as soon as the reference exists and run while the other tests do. Runs of
the one-device program share the session's persistent compilation cache (conftest), which the
reference itself filled: compiled once, loaded after.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, experiment_config, persistent_compilation_cache, subprocess_cache_env
from imask_jax import configs, errors, parallel
from imask_jax import workdir as workdir_lib
from imask_jax.models import build
from imask_jax.training import optim, steps, train

SMOKE = 'experiments/phantom_knee.py:smoke'


def parallel_atol(config) -> float:
  """Largest parameter difference allowed between runs that differ only in the order of their
  float reductions (1 vs 2 devices or processes): a fiftieth of the summed step sizes.

  Adam moves a parameter by eta_t * m_hat / (sqrt(v_hat) + eps) per step, a factor of magnitude
  about 1 whatever the gradient's scale; a data or key mix-up changes the gradients themselves,
  so it moves the most-changed parameters by the order of sum_t eta_t (3.0e-3 for the smoke
  schedule). Reordering a float32 sum of K terms changes it by at most about K u (u = 2^-24,
  K ~ 1.7e3 for a 3x3x192 conv): 1e-4 of sum eta, except for gradients near Adam's eps
  (1e-8), whose updates amplify rounding; with those the smoke run's parameters differed by
  3.8e-6 = 1.3e-3 of sum eta (XLA default flags; -O0 flips discrete proposal choices and is
  not comparable). sum eta / 50 = 6e-5 lies 16x above that and 50x below a mix-up, and
  follows the config's schedule and step count instead of one measurement.
  """
  schedule = optim.learning_rate_schedule(config.train)
  return sum(float(schedule(s)) for s in range(int(config.train.steps))) / 50


# Logged losses: step 1 starts from identical parameters, so its loss differs by forward-pass
# rounding only (a few u times log2 of the ~1e5 terms summed: ~2e-6 relative); later steps add
# the parameter differences above, which moved the losses by 1e-5 relative. A mix-up changes a
# step's batch or sampled anchors and its loss by percents: 1e-4 separates the two.
PARALLEL_LOSS_RTOL = 1e-4


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope='module')
def xla_cache(xla_cache_dir):
  """The session's persistent compilation cache (conftest; the smoke run filled it), on for this
  module's in-process runs and passed to the one-device subprocesses."""
  with persistent_compilation_cache(xla_cache_dir):
    yield xla_cache_dir


@pytest.fixture(scope='module')
def reference(xla_cache, smoke_workdir):
  """The one-device smoke run: its workdir, config, final state and data_dir."""
  config = workdir_lib.load_config(smoke_workdir)
  return dict(
    workdir=smoke_workdir,
    config=config,
    state=restore(smoke_workdir),
    data_dir=config.data.data_dir,
  )


def restore(workdir: str, step: int | None = None) -> steps.TrainState:
  """Checkpoint `step` (default latest) of a workdir, restored onto this process's devices."""
  config = workdir_lib.load_config(workdir)
  model = build.build_model(config, batch_stats_axis=parallel.DATA_AXIS)
  tx = optim.make_optimizer(config.train)
  template = jax.eval_shape(lambda: steps.init_state(model, tx, int(config.seed)))
  manager = workdir_lib.checkpoint_manager(workdir, config)
  try:
    return jax.device_get(workdir_lib.restore_state(manager, template, parallel.data_mesh(), step))
  finally:
    manager.close()


def max_abs_difference(a, b) -> float:
  return max(
    float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def read_jsonl(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
  """step -> logged train/loss; a step logged twice would be a resume bug."""
  records = [r for r in read_jsonl(workdir) if 'train/loss' in r]
  logged = [r['step'] for r in records]
  assert len(logged) == len(set(logged)), f'steps logged twice in {workdir}: {logged}'
  return {r['step']: r['train/loss'] for r in records}


def validation(workdir: str) -> dict[str, float]:
  (record,) = [r for r in read_jsonl(workdir) if 'val/dice_mean' in r]
  return {k: v for k, v in record.items() if k.startswith('val/')}


def subprocess_env(cache: str | None, devices: int = 1) -> dict[str, str]:
  env = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL='2',
    CUDA_VISIBLE_DEVICES='',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  for name in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR') + parallel.CLUSTER_ENV:
    env.pop(name, None)
  if cache:
    env.update(subprocess_cache_env(cache))
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def main_flags(reference: dict, workdir: str) -> list[str]:
  """The flags of `python -m imask_jax.main` for the reference's config (smoke, its data)."""
  return [
    f'--config={SMOKE}',
    f'--config.data.data_dir={reference["data_dir"]}',
    f'--workdir={workdir}',
  ]


@dataclasses.dataclass
class Job:
  """Subprocesses of one run (several for a multi-process run), each logging to a file (not a
  pipe: orbax logs enough to fill one)."""

  workdir: str
  processes: list[subprocess.Popen]
  logs: list[str]

  @classmethod
  def start(
    cls, workdir: str, commands: list[list[str]], env: dict[str, str], tag: str = ''
  ) -> Job:
    processes, logs = [], []
    for i, command in enumerate(commands):
      logs.append(f'{workdir}.{tag}{i}.log')
      with open(logs[-1], 'w') as log:
        processes.append(
          subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return cls(workdir, processes, logs)

  def tail(self, i: int = 0) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()[-4000:]

  def wait(self) -> None:
    """Waits for every process; all must exit 0. No deadline: a run of the smoke config ends by
    itself (a fixed number of steps; gloo collectives give up after 30 s), however loaded the
    machine is."""
    for process in self.processes:
      process.wait()
    for i, process in enumerate(self.processes):
      assert process.returncode == 0, (
        f'{process.args[-3:]} exited {process.returncode}:\n{self.tail(i)}'
      )

  def stop(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def main_command(reference: dict, workdir: str) -> list[str]:
  return [sys.executable, '-m', 'imask_jax.main'] + main_flags(reference, workdir)


# Each process reads the one-process stream of global batches and keeps its own rows: the
# input pipeline itself gives each process a different share of the files (a different but
# equally valid stream), which would make the runs incomparable.
TWO_PROCESS_DRIVER = r'''
import jax
from absl import app
from imask_jax import input_pipeline, main

real_create_train_dataset = input_pipeline.create_train_dataset


class OneProcessView:
  """What input_pipeline sees of jax: one process with one device."""
  def __getattr__(self, name):
    return getattr(jax, name)
  process_index = staticmethod(lambda: 0)
  process_count = staticmethod(lambda: 1)
  device_count = staticmethod(lambda: 1)
  local_device_count = staticmethod(lambda: 1)


def create_train_dataset(config, data_dir, **kwargs):
  input_pipeline.jax = OneProcessView()
  try:
    batches = real_create_train_dataset(config, data_dir, **kwargs)  # [1, global, ...]
  finally:
    input_pipeline.jax = jax
  rows = int(config.train.batch_size) // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  for batch in batches:
    yield {k: v[:, mine] for k, v in batch.items()}


input_pipeline.create_train_dataset = create_train_dataset
app.run(main.main)
'''


def reserve_port() -> socket.socket:
  """A bound, not listening, loopback socket with SO_REUSEPORT: its port stays ours (no other
  bind or outgoing connection of any process gets it) until it is closed, yet the coordinator's
  gRPC server, which sets SO_REUSEPORT too, can bind and listen on it. Closing the socket right
  after choosing the port would leave a window in which another process could take it."""
  s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  s.bind(('127.0.0.1', 0))
  return s


@pytest.fixture(scope='module')
def parallel_jobs(reference, tmp_path_factory):
  """The 2-device run and the two-process pair, started together in the background (without
  the shared compilation cache: their programs are their own, and concurrent writers of one
  cache entry could expose a half-written file)."""
  base = tmp_path_factory.mktemp('parallel')
  two_devices = str(base / 'two_devices')
  two_processes = str(base / 'two_processes')
  reserved = reserve_port()  # held until both processes are done
  address = f'127.0.0.1:{reserved.getsockname()[1]}'
  jobs = {
    'two_devices': Job.start(
      two_devices, [main_command(reference, two_devices)], subprocess_env(None, devices=2)
    ),
    'two_processes': Job.start(
      two_processes,
      [
        [sys.executable, '-c', TWO_PROCESS_DRIVER]
        + main_flags(reference, two_processes)
        + [f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}']
        for i in range(2)
      ],
      subprocess_env(None),
    ),
  }
  yield jobs
  for job in jobs.values():
    job.stop()
  reserved.close()


def assert_same_config(workdir: str, reference: dict) -> None:
  """Guards a comparison: the run trained exactly the reference's config."""
  assert workdir_lib.load_config(workdir).to_dict() == reference['config'].to_dict()


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_keep_the_latest_and_the_best_across_a_restart(tmp_path):
  """LatestN(1) + BestN(1) by val/dice_mean: the best step survives later saves, also after the
  manager is re-created (orbax only writes metrics to disk when best_fn is set)."""
  config = experiment_config('phantom_knee', 'smoke')
  config.train.keep_checkpoints = 1
  workdir = str(tmp_path)
  state = {'w': np.arange(3.0)}

  def save(manager, step, dice):
    metrics = None if dice is None else {'val/dice_mean': dice, 'val/dice_femur': 0.0}
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave({'w': state['w'] + step})),
      metrics=metrics,
    )

  manager = workdir_lib.checkpoint_manager(workdir, config)
  save(manager, 1, None)
  save(manager, 2, 0.9)
  save(manager, 3, None)
  save(manager, 4, 0.5)
  assert list(manager.all_steps()) == [2, 4]
  manager.close()
  manager = workdir_lib.checkpoint_manager(workdir, config)  # a resumed run
  assert manager.best_step() == 2
  save(manager, 5, None)
  save(manager, 6, 0.7)
  assert list(manager.all_steps()) == [2, 6]
  assert manager.best_step() == 2
  restored = manager.restore(
    2, args=ocp.args.Composite(state=ocp.args.StandardRestore({'w': np.zeros(3)}))
  )
  np.testing.assert_array_equal(restored['state']['w'], np.arange(3.0) + 2)
  manager.close()


# --- the missing-data message --------------------------------------------------------------------


def test_oai_without_data_stops_at_once_with_directions(tmp_path, monkeypatch, capsys):
  """experiments/oai.py with an empty folder: DataMissingError before any build or compile,
  naming the folder, the layout, docs/data.md and the phantom experiment; main.py turns it
  into exit status 1 with that message."""
  from absl import flags

  from imask_jax import main

  config = experiment_config('oai')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(tmp_path / 'oai')
  # No timing: what must not happen before the message is heavy work, so count it. JAX reports
  # every trace, lowering and XLA compile to jax.monitoring listeners.
  work = []

  def on_event(name, *args, **kwargs):
    if name.startswith('/jax/core/compile/'):
      work.append(name)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    with pytest.raises(errors.DataMissingError) as error:
      train.train_and_evaluate(config, str(tmp_path / 'run'))
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert not work, f'traced or compiled before the missing data was reported: {work}'
  message = str(error.value)
  for part in (
    str(tmp_path / 'oai'),
    'images',
    'segmentation_masks',
    'docs/data.md',
    'experiments/phantom_knee.py',
    '--config.data.manual_dir',
  ):
    assert part in message
  assert not os.path.exists(tmp_path / 'run') and not os.path.exists(tmp_path / 'tfds')

  argv = [
    'main',
    '--config=experiments/oai.py',
    f'--config.data.manual_dir={tmp_path / "oai"}',
    f'--config.data.data_dir={tmp_path / "tfds"}',
    f'--workdir={tmp_path / "run"}',
  ]
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags finds the --config.x overrides there
  try:
    flags.FLAGS(argv)
    with pytest.raises(SystemExit) as exit_:
      main.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_.value.code == errors.EXIT_REFUSED
  assert capsys.readouterr().err.startswith('DataMissingError: ' + str(tmp_path / 'oai'))


# --- optimiser -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_schedule_warms_up_then_decays_and_decay_spares_norms_and_biases():
  t = configs.default_config().train
  t.steps, t.warmup_steps, t.learning_rate = 110, 10, 1e-3
  cosine = optim.learning_rate_schedule(t)
  # Linear from lr / 100 to lr over the warm-up, then cosine from lr to lr / 100.
  np.testing.assert_allclose(
    [float(cosine(s)) for s in (0, 5, 10, 60, 110)],
    [1e-5, 1e-5 + 0.5 * (1e-3 - 1e-5), 1e-3, 1e-5 + 0.5 * (1e-3 - 1e-5), 1e-5],
    rtol=1e-5,
  )
  t.schedule = 'step'
  step = optim.learning_rate_schedule(t)  # x0.1 from 2/3 and from 8/9 of the 100 main steps
  np.testing.assert_allclose(
    [float(step(s)) for s in (10, 10 + 65, 10 + 66, 10 + 88)], [1e-3, 1e-3, 1e-4, 1e-5], rtol=1e-5
  )
  t.schedule = 'linear'
  with pytest.raises(ValueError, match="train.schedule must be 'cosine', 'step' or 'constant'"):
    optim.learning_rate_schedule(t)

  t.schedule, t.weight_decay, t.grad_clip_norm, t.warmup_steps = 'constant', 0.5, 0.0, 0
  params = {'kernel': np.ones((2, 2), np.float32), 'scale': np.ones(2, np.float32)}
  zero = jax.tree.map(np.zeros_like, params)
  for name in ('adam', 'sgd'):
    t.optimizer = name
    tx = optim.make_optimizer(t)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradients: only decoupled weight decay moves the kernel, by lr * wd * w.
    np.testing.assert_allclose(updates['kernel'], -1e-3 * 0.5 * params['kernel'], rtol=1e-5)
    np.testing.assert_array_equal(updates['scale'], 0.0)
  t.learning_rate = 0.0
  with pytest.raises(ValueError, match='train.learning_rate=0.0'):
    optim.make_optimizer(t)


# --- one device: logs ----------------------------------------------------------------------------


@pytest.mark.usefixtures('parallel_jobs')  # start the background runs as early as possible
def test_reference_run_writes_its_logs(reference):
  """metrics.jsonl: the train scalars every log_every steps with the schedule's learning rate,
  validation Dice per class at the end; TensorBoard: the same tags plus the overlay; the
  resolved config round-trips; checkpoints at every checkpoint_every and the end."""
  config, workdir = reference['config'], reference['workdir']
  expected = experiment_config('phantom_knee', 'smoke')
  expected.data.data_dir = config.data.data_dir
  assert config.to_dict() == expected.to_dict()
  t = config.train
  records = read_jsonl(workdir)
  logged = [r for r in records if 'train/loss' in r]
  expected_steps = sorted({s for s in range(1, t.steps + 1) if s % t.log_every == 0} | {t.steps})
  assert [r['step'] for r in logged] == expected_steps
  schedule = optim.learning_rate_schedule(t)
  terms = (
    ('rpn_cls', 'rpn_box', 'box_cls', 'box_reg', 'mask')
    + (('mask_dice',) if config.model.mask_dice_weight > 0 else ())
    + (('mask_point',) if config.model.point_head.enabled else ())
  )
  for r in logged:
    for key in [f'train/{k}' for k in terms] + [
      'train/grad_norm',
      'train/step_time',
      'train/slices_per_second',
    ]:
      assert np.isfinite(r[key]) and r[key] >= 0, key
    parts = sum(r[f'train/{k}'] for k in terms)
    np.testing.assert_allclose(r['train/loss'], parts, rtol=1e-6)
    # The update of step s uses the schedule at count s - 1 (no skipped step here).
    np.testing.assert_allclose(r['train/learning_rate'], float(schedule(r['step'] - 1)), rtol=1e-6)
    np.testing.assert_allclose(
      r['train/slices_per_second'] * r['train/step_time'], t.batch_size, rtol=1e-6
    )
    assert r['train/nonfinite_total'] == 0 and r['train/nonfinite_steps'] == 0
  val = [r for r in records if 'val/dice_mean' in r]
  assert [r['step'] for r in val] == [t.steps]
  dice = [val[0][f'val/dice_{name}'] for name in config.data.class_names]
  assert all(0.0 <= d <= 1.0 for d in dice)
  np.testing.assert_allclose(val[0]['val/dice_mean'], np.mean(dice))

  import tensorflow as tf

  tags = set()
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {
    'train/loss',
    'train/learning_rate',
    'train/step_time',
    'train/slices_per_second',
    'val/dice_mean',
    'val/overlay',
  } <= tags

  checkpoints = sorted(
    int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()
  )
  assert checkpoints[-1] == t.steps and t.checkpoint_every in checkpoints
  assert int(reference['state'].step) == t.steps


# --- same seed, same curve; resume after SIGKILL -------------------------------------------------


def test_a_rerun_killed_and_restarted_gives_the_same_curve_and_parameters(
  reference, xla_cache, tmp_path
):
  """The reference config again, in a subprocess, `kill -9`-ed once its first checkpoint is on
  disk and started again: it resumes from that checkpoint and ends with the reference's loss
  curve (steps before the kill from the first start, after it from the second, each once) and
  its parameters bit for bit; the progress lines show step, loss, rate and ETA."""
  workdir = str(tmp_path / 'killed')
  config = reference['config']
  env = subprocess_env(xla_cache)
  first = Job.start(workdir, [main_command(reference, workdir)], env, tag='first')
  marker = os.path.join(workdir, 'checkpoints', str(config.train.checkpoint_every))
  # No deadline: the run either writes the marker or ends by itself after its last step.
  while not os.path.isdir(marker) and first.processes[0].poll() is None:
    time.sleep(0.01)
  first.processes[0].send_signal(signal.SIGKILL)
  first.processes[0].wait()
  assert first.processes[0].returncode == -signal.SIGKILL, (
    f'the run ended before the kill:\n{first.tail()}'
  )
  assert os.path.isdir(marker), first.tail()
  assert not os.path.isdir(os.path.join(workdir, 'checkpoints', str(config.train.steps)))

  second = Job.start(workdir, [main_command(reference, workdir)], env, tag='second')
  second.wait()
  log = second.tail()
  assert f'resumed from the checkpoint of step {config.train.checkpoint_every}' in log
  final = [line for line in log.splitlines() if line.startswith(f'step {config.train.steps}/')]
  assert final and all(word in final[0] for word in ('loss', 'lr', 'slices/s', 'ETA'))
  assert_same_config(workdir, reference)
  assert train_losses(workdir) == train_losses(reference['workdir'])
  state = restore(workdir)
  assert int(state.step) == config.train.steps
  assert max_abs_difference(state.params, reference['state'].params) == 0.0
  assert max_abs_difference(state.opt_state, reference['state'].opt_state) == 0.0


# --- non-finite steps ----------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(reference, tmp_path, monkeypatch):
  """NaN images at steps 2, 4 and 5 with max_nonfinite_in_a_row = 2: step 2 changes nothing
  but the counters, step 3 trains again, and step 5 stops the run with a message naming the
  last good checkpoint (step 4), which is kept, as are the earlier ones."""
  from imask_jax import input_pipeline

  config = workdir_lib.load_config(reference['workdir'])
  config.train.max_nonfinite_in_a_row = 2
  config.train.checkpoint_every = 1
  config.train.keep_checkpoints = 10
  config.train.log_every = 1
  nan_steps = {2, 4, 5}
  real = input_pipeline.create_train_dataset

  def poisoned(*args, **kwargs):
    for step, batch in enumerate(real(*args, **kwargs), start=1):
      if step in nan_steps:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, 'create_train_dataset', poisoned)
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert '2 non-finite losses or gradients in a row (steps 4 to 5; 3 skipped in all' in message
  assert 'the last good checkpoint, step 4, is kept' in message

  assert sorted(
    int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()
  ) == [1, 2, 3, 4]
  checkpoints = {step: restore(workdir, step) for step in (1, 2, 3, 4)}
  assert max_abs_difference(checkpoints[2].params, checkpoints[1].params) == 0.0
  assert max_abs_difference(checkpoints[2].opt_state, checkpoints[1].opt_state) == 0.0
  assert max_abs_difference(checkpoints[3].params, checkpoints[2].params) > 0.0
  assert max_abs_difference(checkpoints[4].params, checkpoints[3].params) == 0.0
  assert [int(checkpoints[s].nonfinite_total) for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
  assert [int(checkpoints[s].nonfinite_in_a_row) for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
  for state in checkpoints.values():
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))

  records = {r['step']: r for r in read_jsonl(workdir)}
  assert sorted(records) == [1, 2, 3, 4, 5]
  assert [records[s]['train/nonfinite_total'] for s in range(1, 6)] == [0, 1, 1, 2, 3]
  assert [records[s]['train/nonfinite_steps'] for s in range(1, 6)] == [0, 1, 0, 1, 1]
  assert 'train/loss' not in records[2] and np.isfinite(records[3]['train/loss'])


# --- data parallel -------------------------------------------------------------------------------


def assert_matches_reference(workdir: str, reference: dict) -> None:
  assert_same_config(workdir, reference)
  losses, expected = train_losses(workdir), train_losses(reference['workdir'])
  assert losses.keys() == expected.keys()  # each step once: only process 0 logs
  np.testing.assert_allclose(
    [losses[s] for s in losses], [expected[s] for s in losses], rtol=PARALLEL_LOSS_RTOL
  )
  val, expected_val = validation(workdir), validation(reference['workdir'])
  assert val.keys() == expected_val.keys()
  np.testing.assert_allclose([val[k] for k in val], [expected_val[k] for k in val], atol=1e-3)
  state = restore(workdir)  # saved by 2 devices, restored onto this process's 1
  config = reference['config']
  assert len(jax.devices()) == 1 and int(state.step) == config.train.steps
  atol = parallel_atol(config)
  difference = max_abs_difference(state.params, reference['state'].params)
  print(
    f'{workdir}: parameters differ from the reference by at most {difference:.2e} '
    f'(tolerance {atol:.2e})'
  )
  assert difference < atol
  # The tolerance can see a mix-up: the reference's own last steps moved it 10x further.
  earlier = restore(reference['workdir'], int(config.train.checkpoint_every))
  assert max_abs_difference(earlier.params, reference['state'].params) > 10 * atol


def test_two_devices_match_one_and_their_checkpoint_restores_on_one(reference, parallel_jobs):
  """The same global batch split over 2 (forced host) devices: the reference's loss curve,
  validation Dice and parameters to float tolerance; its checkpoint restores on 1 device."""
  job = parallel_jobs['two_devices']
  job.wait()
  assert_matches_reference(job.workdir, reference)


def test_two_processes_on_loopback_match_one_device(reference, parallel_jobs):
  """Two processes (one CPU device each, gloo collectives, coordinator on 127.0.0.1) fed the
  rows of the same global batches: the reference's parameters to float tolerance, one set of
  logs (process 0 writes them) and the reference's validation Dice, pooled over both."""
  job = parallel_jobs['two_processes']
  job.wait()
  assert_matches_reference(job.workdir, reference)
  assert 'validation @' not in job.tail(1) and 'validation @' in job.tail(0)
