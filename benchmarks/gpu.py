"""Training and inference speed of the paper's setting on the accelerator (GPU readiness).

Run (from the repository root, after `make install JAX_ACCELERATOR=cuda13`):
  benchmarks/gpu.sh [OUT_DIR]                      # the documented run
  .venv/bin/python benchmarks/gpu.py --devices both --json /tmp/gpu.json
  .venv/bin/python benchmarks/gpu.py --smoke       # tiny, to check the script on CPU

The model is the one `python -m imask_jax.main --config experiments/oai.py` trains: the
config comes from the experiment file through `imask_jax.configs.load_experiment` (what
ml_collections' config_flags does for main), and only `--size` (data.image_size, the training
crop), `--backbone` (model.backbone) and `--batch` (train.batch_size and eval.batch_size) are
changed. By default: 1024 x 1024 crops at 0.1367 mm, ResNet-101-FPN with group norm, the
iMaskRCNN head, global batch 8, clipped Adam with the experiment's warm-up schedule.

What is timed, each in its own process (so that its peak memory is its own):

* "train": `steps.make_train_step` (jit of shard_map over the `data` mesh, the trainer's own
  step), compiled ahead of time ("compile s"), on one synthetic batch of the experiment's
  input shapes (`train_step.synthetic_batch`: 4 ellipses of 4 classes per image, cut to the
  config's channels and instance slots). "first s" is the first call, then `--warmup` - 1
  more, then the median of `--steps` timed calls; images/s = global batch / median.
* "infer": `whole_volume.predict_volume`, the path of evaluate and predict (slices prepared by
  the input pipeline, detection, masks pasted at source resolution, the bones' largest 3D
  component), on a synthetic volume of `--volume` ROWS COLS SLICES (384 x 384 x 160: an OAI
  DESS knee) at `--volume_spacing` mm (0.3646 in-plane, 0.7 between sagittal slices, so that
  each slice becomes a 1024 x 1024 network input at 0.1367 mm). The model is freshly
  initialised and held in memory as an `loading.LoadedModel` (no checkpoint is written or
  read; `load_model` would restore the same variables from a workdir). Batches of `--batch`
  slices. "prep s" is `input_pipeline.volume_inputs` alone (host, tf.data), "first s" the
  first whole volume (compiles included: jit compiles on first use), then the median of
  `--volume_repeats` volumes; slices/s = slices / median. A fresh model detects little, and
  the host-side steps after detection (pasting, largest component) grow with what is
  detected: a trained model's volume may take somewhat longer.

Devices (`--devices`): "1" (the first device only: jax_cuda_visible_devices / jax_num_cpu_devices
set before jax starts), "all" (every device of the host; the global batch is split over them,
so it must be a multiple of their count) or "both". Peak memory is the largest
`memory_stats()['peak_bytes_in_use']` over the devices where the backend reports it (GPU,
TPU: what XLA's allocator held at most, whatever it preallocated), else the process's peak
RSS (CPU: host memory, compile included); the table says which.

The parent process never starts jax (on a GPU it would preallocate the memory its workers
need); a probe process counts the devices. Nothing here needs the network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import train_step  # benchmarks/train_step.py: the synthetic batch and the table printer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = 'experiments/oai.py'
SEED = 0
DEVICE_CHOICES = ('1', 'all', 'both')
# OAI DESS: 384 x 384 sagittal slices of 0.3646 mm, 160 of them 0.7 mm apart.
OAI_VOLUME = (384, 384, 160)
OAI_SPACING_MM = (0.3646, 0.3646, 0.7)

# Settings when a flag is not given: the documented run, and the CPU check of --smoke (the
# experiment's own smoke variant: ResNet-18 at width 8, 64 -> here 128 px crops).
DEFAULTS = dict(
  config=DEFAULT_CONFIG,
  size=1024,
  backbone='',  # '' = the experiment's (resnet101 in oai.py)
  batch=8,
  steps=10,
  warmup=2,
  volume=OAI_VOLUME,
  volume_repeats=3,
)
SMOKE = dict(
  config=DEFAULT_CONFIG + ':smoke',
  size=128,
  backbone='resnet18',
  batch=2,
  steps=2,
  warmup=1,
  volume=(64, 64, 8),
  volume_repeats=1,
)


# ------------------------------------------------------------------------------ the worker
def restrict_devices(devices: str) -> None:
  """With devices '1', lets jax see only its first device. Must run before jax starts its
  backends (before the first jax operation)."""
  import jax

  if devices == '1':
    jax.config.update('jax_cuda_visible_devices', '0')
    jax.config.update('jax_rocm_visible_devices', '0')
    jax.config.update('jax_num_cpu_devices', 1)


def load_config(run: dict[str, Any]) -> Any:
  """The experiment's config (`--config PATH[:ARG]`, as main takes it) with the run's size,
  backbone and batch."""
  from imask_jax import configs

  path, _, arg = run['config'].partition(':')
  config = configs.load_experiment(str(REPO / path) if not os.path.isabs(path) else path, arg)
  config.data.image_size = (run['size'], run['size'])
  if run['backbone']:
    config.model.backbone = run['backbone']
  config.train.batch_size = run['batch']
  config.eval.batch_size = run['batch']
  return config


def peak_memory() -> tuple[float, str]:
  """(bytes, source): the largest device peak_bytes_in_use where reported, else peak RSS."""
  import resource

  import jax

  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  if stats and all('peak_bytes_in_use' in s for s in stats):
    return float(max(s['peak_bytes_in_use'] for s in stats)), 'device peak'
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, 'process RSS'


def fit_slots(x: np.ndarray, count: int) -> np.ndarray:
  """x [B, M, ...] cut or zero-padded to [B, count, ...] along the instance axis."""
  if x.shape[1] >= count:
    return x[:, :count]
  pad = [(0, 0), (0, count - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return np.pad(x, pad)


def training_batch(config: Any, batch: int, size: int) -> dict[str, np.ndarray]:
  """A synthetic batch of the config's input shapes (steps.MODEL_INPUT_KEYS).

  image float32 [B, S, S, C] (C = 2 * data.context_slices + 1: the first channel of
  train_step.synthetic_batch, repeated), gt_boxes float32 [B, M, 4], gt_classes int32 [B, M]
  (wrapped into 1..K, K = len(data.class_names)), gt_masks uint8 [B, M, S, S], gt_valid bool
  [B, M], with M = data.max_instances.
  """
  raw = train_step.synthetic_batch(batch, size, SEED)
  channels = 2 * int(config.data.context_slices) + 1
  slots = int(config.data.max_instances)
  classes = fit_slots(raw['gt_classes'], slots)
  valid = fit_slots(raw['gt_valid'], slots)
  return dict(
    image=np.repeat(raw['image'][..., :1], channels, axis=-1),
    gt_boxes=fit_slots(raw['gt_boxes'], slots),
    gt_classes=np.where(valid, (classes - 1) % len(config.data.class_names) + 1, 0).astype(
      np.int32
    ),
    gt_masks=fit_slots(raw['gt_masks'], slots),
    gt_valid=valid,
  )


def timed_calls(call, warmup: int, repeats: int) -> dict[str, Any]:
  """Runs `call()` once ("first"), warmup - 1 more times, then `repeats` timed times (s)."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return {'first_s': first, 'times_s': times, 'median_s': statistics.median(times)}


def compiled_train_step(config: Any, batch_size: int, size: int) -> tuple[Any, Any, Any, float]:
  """The trainer's step for `config` on a synthetic batch, compiled as the trainer compiles it
  (`steps.compile_together`): (compiled step, its train state, device batch, compile s)."""
  from imask_jax import parallel
  from imask_jax.models import build
  from imask_jax.training import optim
  from imask_jax.training import steps as steps_lib

  mesh = parallel.data_mesh()
  model = build.build_model(config, batch_stats_axis=parallel.DATA_AXIS)
  tx = optim.make_optimizer(config.train)
  seed = int(config.seed)
  state = parallel.replicate(steps_lib.init_state(model, tx, seed), mesh)
  host_batch = training_batch(config, batch_size, size)
  batch = parallel.shard_batch({k: host_batch[k] for k in steps_lib.MODEL_INPUT_KEYS}, mesh)
  step = steps_lib.make_train_step(
    model, tx, mesh, seed, optim.learning_rate_schedule(config.train)
  )
  start = time.perf_counter()
  compiled = steps_lib.compile_together(step, (state, batch), 'train step')
  return compiled, state, batch, time.perf_counter() - start


def time_training(config: Any, run: dict[str, Any]) -> dict[str, Any]:
  """Compiles and times the trainer's step on a synthetic batch (module docstring)."""
  import jax

  compiled, state, batch, compile_s = compiled_train_step(config, run['batch'], run['size'])
  carried = {'state': state, 'losses': []}

  def call() -> None:
    # The state is donated: carry the new one. Waiting for it too (not only the metrics)
    # keeps the parameter update inside the timed call.
    carried['state'], metrics = jax.block_until_ready(compiled(carried['state'], batch))
    carried['losses'].append(float(metrics['loss']))

  timing = timed_calls(call, run['warmup'], run['steps'])
  return dict(
    timing,
    compile_s=compile_s,
    images_per_s=run['batch'] / timing['median_s'],
    per_device_batch=run['batch'] // jax.device_count(),
    losses=carried['losses'],
  )


def synthetic_volume(shape: tuple[int, int, int], spacing: tuple[float, ...], plane: str) -> Any:
  """A readers.Volume whose slices along `plane` are ROWS x COLS (`shape` = rows, cols,
  slices; `spacing` = row, col, slice mm): noise around a bright ellipsoid, on a RAS+ grid."""
  from data_pipelines import orientation, readers

  rows, cols, count = shape
  rng = np.random.default_rng(SEED)
  n, r, c = np.ogrid[-1 : 1 : count * 1j, -1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
  inside = (n / 0.8) ** 2 + (r / 0.5) ** 2 + (c / 0.4) ** 2 <= 1.0
  stack = (rng.normal(100.0, 10.0, (count, rows, cols)) + 300.0 * inside).astype(np.float32)
  image = orientation.slices_to_volume(stack, plane)
  axes = orientation.plane_axes(plane)
  canonical_spacing = [0.0, 0.0, 0.0]
  for axis, mm in zip((axes.row_axis, axes.col_axis, axes.slice_axis), spacing):
    canonical_spacing[axis] = float(mm)
  grid = orientation.SourceGrid.from_affine(image.shape, np.diag(canonical_spacing + [1.0]))
  return readers.Volume(
    case_id='synthetic',
    image=image,
    labels=None,
    spacing=tuple(canonical_spacing),
    grid=grid,
    plane=plane,
    image_path='',
    label_path=None,
    reader=None,
  )


def time_inference(config: Any, run: dict[str, Any]) -> dict[str, Any]:
  """Times predict_volume on a synthetic volume (module docstring)."""
  from imask_jax import input_pipeline
  from imask_jax.inference import loading, whole_volume

  # predict's path: the mask head on the painting slots where the experiment sets them.
  model = loading.initialised_model(config, paint_only=True)
  volume = synthetic_volume(tuple(run['volume']), tuple(run['volume_spacing']), config.data.plane)
  labelled = []

  def call() -> None:
    prediction = whole_volume.predict_volume(model, volume)
    labelled.append(int(np.count_nonzero(prediction.label_map)))

  timing = timed_calls(call, 1, run['volume_repeats'])
  # The preparation alone, after the volumes: without tf.data's one-off start-up.
  start = time.perf_counter()
  inputs = input_pipeline.volume_inputs(volume, config)
  prep_s = time.perf_counter() - start
  slices = int(run['volume'][2])
  return dict(
    timing,
    prep_s=prep_s,
    slices=slices,
    slices_per_s=slices / timing['median_s'],
    input_size=[int(n) for n in inputs['image'].shape[1:3]],
    labelled_voxels=labelled[-1],
  )


def worker(mode: str, devices: str, run: dict[str, Any]) -> dict[str, Any]:
  """One measurement in this process: 'probe' (the devices and the model), 'train' or
  'infer'."""
  restrict_devices(devices)
  import jax

  out: dict[str, Any] = dict(
    mode=mode,
    devices=jax.device_count(),
    platform=jax.devices()[0].platform,
    device_kind=jax.devices()[0].device_kind,
    jax=jax.__version__,
  )
  config = load_config(run)
  out['head'] = str(config.model.mask_head)
  out['backbone'] = str(config.model.backbone)
  if mode == 'probe':
    return out
  out.update(time_training(config, run) if mode == 'train' else time_inference(config, run))
  out['peak_bytes'], out['memory_source'] = peak_memory()
  return out


# ------------------------------------------------------------------------------ the parent
def run_worker(
  mode: str, devices: str, run: dict[str, Any], timeout: float
) -> tuple[dict | None, str]:
  """Runs `worker` in a subprocess; (its result, '') or (None, the reason it failed)."""
  command = [sys.executable, str(Path(__file__).resolve()), '--worker', mode, '--devices', devices]
  command += ['--run', json.dumps(run)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None, f'timed out after {timeout:.0f} s'
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    tail = proc.stderr.strip().splitlines()[-1:] or ['no output']
    sys.stderr.write(proc.stderr[-4000:])
    return None, f'exit {proc.returncode}: {tail[0][:200]}'
  return json.loads(lines[-1]), ''


def device_settings(choice: str, count: int) -> list[str]:
  """Worker --devices values for a --devices choice on a host of `count` devices."""
  if choice == 'both':
    return ['1', 'all'] if count > 1 else ['1']
  return [choice]


def gib(value: float | None) -> str:
  return train_step.fmt(None if value is None else value / 2**30, '.2f')


TRAIN_HEADER = ['devices', 'batch', 'per device', 'compile s', 'first s', 'median s', 'img/s']
INFER_HEADER = ['devices', 'batch', 'input', 'prep s', 'first s', 's/volume', 'slices/s']
MEMORY_HEADER = ['peak GiB', 'memory']


def train_row(r: dict[str, Any]) -> list[str]:
  return [
    str(r['devices']),
    str(r['batch']),
    str(r['per_device_batch']),
    f'{r["compile_s"]:.1f}',
    f'{r["first_s"]:.2f}',
    f'{r["median_s"]:.3f}',
    f'{r["images_per_s"]:.2f}',
    gib(r['peak_bytes']),
    r['memory_source'],
  ]


def infer_row(r: dict[str, Any]) -> list[str]:
  return [
    str(r['devices']),
    str(r['batch']),
    'x'.join(str(n) for n in r['input_size']),
    f'{r["prep_s"]:.2f}',
    f'{r["first_s"]:.2f}',
    f'{r["median_s"]:.2f}',
    f'{r["slices_per_s"]:.1f}',
    gib(r['peak_bytes']),
    r['memory_source'],
  ]


def print_results(results: list[dict], run: dict[str, Any], probe: dict, markdown: bool) -> None:
  """The header line and one table per mode; failed runs as rows that say why."""
  shape, spacing = run['volume'], run['volume_spacing']
  print(
    f'# {datetime.date.today()}  jax {probe["jax"]}  {probe["platform"]}: '
    f'{probe["devices"]} x {probe["device_kind"]}  config {run["config"]}  '
    f'{run["size"]} x {run["size"]} crops  {probe["backbone"]}  {probe["head"]} head  global batch '
    f'{run["batch"]}  train: warmup {run["warmup"]}, median of {run["steps"]} steps  '
    f'infer: {shape[0]} x {shape[1]} x {shape[2]} volume at {spacing[0]} x {spacing[1]} x '
    f'{spacing[2]} mm, median of {run["volume_repeats"]}  load average '
    f'{os.getloadavg()[0]:.1f}'
  )
  for mode, header, row in (
    ('train', TRAIN_HEADER, train_row),
    ('infer', INFER_HEADER, infer_row),
  ):
    chosen = [r for r in results if r['mode'] == mode]
    if not chosen:
      continue
    blank = ['-'] * (len(header) + len(MEMORY_HEADER) - 3)
    lines = [
      [str(r['devices']), str(run['batch']), 'failed'] + blank if 'error' in r else row(r)
      for r in chosen
    ]
    print(f'\n{mode}')
    train_step.print_table(header + MEMORY_HEADER, lines, markdown)
    for r in chosen:
      if 'error' in r:
        print(f'{mode} on {r["devices"]} device(s) failed: {r["error"]}')


def resolve_run(args: argparse.Namespace) -> dict[str, Any]:
  """The run's settings: flags given, else --smoke's, else the documented defaults."""
  base = SMOKE if args.smoke else DEFAULTS
  run = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in DEFAULTS}
  run['volume'] = [int(n) for n in run['volume']]
  run['volume_spacing'] = [float(mm) for mm in args.volume_spacing]
  return run


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', help=f'experiment file[:arg] (default {DEFAULT_CONFIG})')
  parser.add_argument('--size', type=int, help='training crop, px (default 1024)')
  parser.add_argument('--backbone', help="model.backbone (default: the experiment's)")
  parser.add_argument('--batch', type=int, help='global batch, train and infer (default 8)')
  parser.add_argument('--steps', type=int, help='timed training steps (default 10)')
  parser.add_argument('--warmup', type=int, help='training calls before timing (default 2)')
  parser.add_argument('--devices', choices=DEVICE_CHOICES, default='both')
  parser.add_argument(
    '--volume', type=int, nargs=3, metavar=('ROWS', 'COLS', 'SLICES'), help='default 384 384 160'
  )
  parser.add_argument(
    '--volume_spacing',
    type=float,
    nargs=3,
    default=list(OAI_SPACING_MM),
    metavar=('ROW', 'COL', 'SLICE'),
    help='mm (default: OAI DESS, 0.3646 0.3646 0.7)',
  )
  parser.add_argument('--volume_repeats', type=int, help='timed volumes (default 3)')
  parser.add_argument('--modes', nargs='+', choices=('train', 'infer'), default=['train', 'infer'])
  parser.add_argument('--smoke', action='store_true', help='tiny settings, to check on CPU')
  parser.add_argument('--timeout', type=float, default=1800.0, help='s per worker process')
  parser.add_argument('--markdown', action='store_true', help='print Markdown tables')
  parser.add_argument('--json', default='', help='also write every figure here')
  # Internal: one measurement in this process, its JSON on the last line of stdout.
  parser.add_argument('--worker', choices=('probe', 'train', 'infer'), help=argparse.SUPPRESS)
  parser.add_argument('--run', help=argparse.SUPPRESS)
  return parser.parse_args()


def main() -> None:
  args = parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.devices, json.loads(args.run or '{}'))))
    return
  run = resolve_run(args)
  if min(run['steps'], run['warmup'], run['volume_repeats'], run['batch']) < 1:
    sys.exit('gpu.py: --steps, --warmup, --volume_repeats and --batch must be >= 1')
  probe, reason = run_worker('probe', 'all', run, args.timeout)
  if probe is None:
    sys.exit(f'gpu.py: could not start jax ({reason})')
  if probe['platform'] == 'cpu' and not args.smoke:
    print('# no accelerator: jax runs on the CPU (make install JAX_ACCELERATOR=cuda13)')
  results = []
  for devices in device_settings(args.devices, probe['devices']):
    count = 1 if devices == '1' else probe['devices']
    for mode in args.modes:
      if run['batch'] % count:
        r, reason = None, f'--batch {run["batch"]} is not a multiple of {count} devices'
      else:
        started = time.perf_counter()
        r, reason = run_worker(mode, devices, run, args.timeout)
        print(f'[{mode} on {devices} device(s): {time.perf_counter() - started:.0f} s]', flush=True)
      if r is None:
        r = dict(mode=mode, devices=count, error=reason)
      results.append(dict(r, batch=run['batch']))
  print_results(results, run, probe, args.markdown)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'run': run, 'probe': probe, 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
