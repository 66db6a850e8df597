"""Volumes per minute of `python -m imask_jax.predict` on OAI-sized knee scans.

Run: TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= \\
       .venv/bin/python benchmarks/predict_throughput.py --volumes 4 [--workdir RUN] [--scratch DIR]

Inputs: `--volumes` knee phantoms (data_pipelines.phantoms, preset 'full': 384 x 384 x 160
voxels of 0.3646 x 0.3646 x 0.7 mm, the grid of OAI's DESS scans), int16 NIfTI, one seed each,
generated once into --scratch and reused by later runs.

Model: `--workdir`, or else the quick-start config (experiments/phantom_knee.py: ResNet-18-FPN
width 16, scale-true at 0.8 mm, so each 384 x 384 slice goes in as 175 x 175 padded to 192 x
192) trained for `--train_steps` steps into --scratch (kept for later runs). How well it
segments does not matter for the network's time (same network, same input size, same number of
detections); the write stage (the report's cartilage thickness maps) costs more when there is
cartilage in the label map, so the default trains long enough (300 steps, about 1-2 min) for
the model to paint bones and cartilage; the mean painted volumes are printed.

Measured, each over the same volumes into fresh output folders:
  1. in this process, the model loaded and compiled once (one volume first, not timed):
     `predict_command(pipeline=False)` (read, segment, write one after the other) and
     `predict_command(pipeline=True)` (the next read and the previous write in background
     threads while the model runs); their label maps are checked to be byte-identical;
  2. the command line as users run it: one process over all volumes, and two processes started
     together with --shard 0/2 and --shard 1/2; wall time from start to the last exit, so it
     includes each process's start-up (imports, checkpoint restore, compile). Each is also run
     over one volume per process; the rate after start-up is that of the other volumes, from
     the difference of the two wall times (what a cohort of thousands approaches).
Prints a Markdown table and the load averages before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_pipelines.atomic import atomic_path  # noqa: E402
from data_pipelines.phantoms import writer  # noqa: E402

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
STAGES = re.compile(r'\(read ([\d.]+) s, segment ([\d.]+) s, write ([\d.]+) s\)')


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def make_volumes(folder: str, count: int, preset: str = 'full') -> list[str]:
  """`count` knee phantoms at `preset` as int16 NIfTI in `folder` (kept ones reused)."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for seed in range(count):
    path = os.path.join(folder, f'knee_{seed:04d}.nii.gz')
    if not os.path.exists(path):
      started = time.perf_counter()
      phantom = writer.generate('knee', seed, preset)
      image = np.rint(np.asarray(phantom.image)).astype(np.int16)
      with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(writer.nifti_bytes(image, phantom.affine))
      print(f'generated {path} {image.shape} in {time.perf_counter() - started:.0f} s', flush=True)
    paths.append(path)
  return paths


def train_quick_start(scratch: str, steps: int) -> str:
  """The quick-start config trained for `steps` steps (or the one trained earlier there)."""
  workdir = os.path.join(scratch, f'quick_start_{steps}_steps')
  if os.path.exists(os.path.join(workdir, 'config.json')):
    return workdir
  started = time.perf_counter()
  subprocess.run(
    [
      sys.executable,
      '-m',
      'imask_jax.main',
      '--config',
      os.path.join(REPO, 'experiments', 'phantom_knee.py'),
      f'--config.train.steps={steps}',
      f'--config.data.data_dir={os.path.join(scratch, "tfds")}',
      '--workdir',
      workdir,
    ],
    cwd=REPO,
    env=ENV,
    check=True,
  )
  print(f'trained {workdir} ({steps} steps) in {time.perf_counter() - started:.0f} s', flush=True)
  return workdir


def stage_means(log: str) -> tuple[float, float, float]:
  """Mean read, segment and write seconds per volume from predict's progress lines."""
  found = np.array([[float(x) for x in m] for m in STAGES.findall(log)])
  return tuple(found.mean(axis=0)) if len(found) else (float('nan'),) * 3


def in_process(workdir: str, volumes: str, scratch: str, count: int, repeats: int) -> list[dict]:
  from imask_jax.inference import loading
  from imask_jax.predict.command import predict_command

  model = loading.load_model(workdir)
  # Compile (and load the training reference) on one volume first.
  warm = first_volumes(volumes, 1, scratch)
  started = time.perf_counter()
  out = os.path.join(scratch, 'out_warmup')
  shutil.rmtree(out, ignore_errors=True)
  predict_command(workdir, warm, out, model=model, stream=io.StringIO())
  print(f'in-process warm-up (compile + 1 volume): {time.perf_counter() - started:.1f} s')
  rows, outputs = [], {}
  modes = [('sequential', False), ('pipelined', True)] * repeats
  for run, (name, pipeline) in enumerate(modes):
    out = os.path.join(scratch, f'out_{name}')
    shutil.rmtree(out, ignore_errors=True)
    stream = io.StringIO()
    started, cpu = time.perf_counter(), cpu_seconds()
    status = predict_command(workdir, volumes, out, model=model, stream=stream, pipeline=pipeline)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    assert status == 0, stream.getvalue()
    outputs[name] = {n: open(os.path.join(out, n), 'rb').read() for n in sorted(os.listdir(out))}
    rows.append(
      dict(
        setting=f'1 process, {name} (model loaded and compiled; run {run // 2 + 1})',
        wall=wall,
        cpu=cpu,
        count=count,
        stages=stage_means(stream.getvalue()),
      )
    )
    print(f'{name}: {wall:.1f} s wall, {cpu:.1f} s CPU', flush=True)
  reports = [json.loads(v) for n, v in outputs['sequential'].items() if n.endswith('.json')]
  means = {t: np.mean([r['volumes_ml'][t] for r in reports]) for t in reports[0]['volumes_ml']}
  print('mean painted volumes (mL): ' + ', '.join(f'{t} {v:.1f}' for t, v in means.items()))
  maps = [n for n in outputs['sequential'] if n.endswith('.nii.gz')]
  same = all(outputs['sequential'][n] == outputs['pipelined'][n] for n in maps)
  print(f'label maps byte-identical, sequential vs pipelined: {same} ({len(maps)} maps)')
  assert same
  return rows


def run_processes(workdir: str, volumes: str, out: str, shards: list[str | None]) -> dict:
  """Starts one predict process per shard at once; returns the wall time to the last exit and
  the stage means of their progress lines."""
  shutil.rmtree(out, ignore_errors=True)
  base = [sys.executable, '-m', 'imask_jax.predict', '--workdir', workdir]
  base += ['--input', volumes, '--output', out]
  started = time.perf_counter()
  procs = [
    subprocess.Popen(
      base + ([f'--shard={shard}'] if shard else []),
      cwd=REPO,
      env=ENV,
      stderr=subprocess.PIPE,
      stdout=subprocess.DEVNULL,
      text=True,
    )
    for shard in shards
  ]
  logs = [[] for _ in procs]
  readers = [threading.Thread(target=lg.extend, args=(p.stderr,)) for p, lg in zip(procs, logs)]
  for t in readers:
    t.start()
  for p in procs:
    p.wait()
  wall = time.perf_counter() - started
  for t in readers:
    t.join()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, ''.join(log)
  return dict(wall=wall, stages=stage_means(''.join(''.join(log) for log in logs)))


def first_volumes(volumes: str, count: int, scratch: str) -> str:
  """A folder of links to the first `count` volumes."""
  folder = os.path.join(scratch, f'first_{count}')
  shutil.rmtree(folder, ignore_errors=True)
  os.makedirs(folder)
  for name in sorted(os.listdir(volumes))[:count]:
    os.symlink(os.path.join(volumes, name), os.path.join(folder, name))
  return folder


def command_line(workdir: str, volumes: str, scratch: str, count: int) -> list[dict]:
  """One process, then two shards at once, each over all volumes and over one volume per
  process: the difference is the time of the other volumes without the start-up."""
  rows = []
  for name, shards in (('1 process', [None]), ('2 processes (--shard 0/2, 1/2)', ['0/2', '1/2'])):
    out = os.path.join(scratch, f'out_{len(shards)}_processes')
    short = run_processes(
      workdir, first_volumes(volumes, len(shards), scratch), out + '_short', shards
    )
    full = run_processes(workdir, volumes, out, shards)
    extra = count - len(shards)
    rows.append(
      dict(
        setting=f'{name}, command line (start-up and {len(shards)} volume(s): '
        f'{short["wall"]:.0f} s)',
        wall=full['wall'],
        cpu=None,
        count=count,
        stages=full['stages'],
        steady=60 * extra / (full['wall'] - short['wall']) if extra > 0 else None,
      )
    )
    print(f'{name}: {full["wall"]:.1f} s wall ({short["wall"]:.1f} s for the first)', flush=True)
  one = os.path.join(scratch, 'out_1_processes')
  two = os.path.join(scratch, 'out_2_processes')
  same = sorted(os.listdir(one)) == sorted(os.listdir(two)) and all(
    open(os.path.join(one, n), 'rb').read() == open(os.path.join(two, n), 'rb').read()
    for n in os.listdir(one)
    if n.endswith('.nii.gz')
  )
  print(f'label maps byte-identical, 1 process vs 2 shards: {same}')
  assert same
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--volumes', type=int, default=4)
  parser.add_argument(
    '--preset',
    default='full',
    choices=('full', 'cpu'),
    help="phantom size: 'full' 384 x 384 x 160 (OAI DESS); 'cpu' 128 x 128 x 64 (a quick check)",
  )
  parser.add_argument('--workdir', default=None, help='a trained workdir (default: train one)')
  parser.add_argument('--train_steps', type=int, default=300)
  parser.add_argument(
    '--scratch',
    default=os.path.join(tempfile.gettempdir(), 'imask_predict_throughput'),
    help='volumes, the quick-start workdir and outputs (kept: later runs reuse the first two)',
  )
  parser.add_argument(
    '--repeats', type=int, default=1, help='in-process runs of each mode, alternating'
  )
  parser.add_argument(
    '--skip', nargs='*', default=(), choices=('in_process', 'processes'), help='parts to skip'
  )
  args = parser.parse_args()
  os.makedirs(args.scratch, exist_ok=True)
  volumes = os.path.join(args.scratch, f'volumes_{args.preset}_{args.volumes}')
  make_volumes(volumes, args.volumes, args.preset)
  workdir = args.workdir or train_quick_start(args.scratch, args.train_steps)
  shape = ' x '.join(map(str, writer.knee.PRESETS[args.preset]['shape']))
  print(f'cpu cores: {os.cpu_count()}; workdir {workdir}; {args.volumes} volumes of {shape}')
  load_before = os.getloadavg()
  print(f'load average before: {" ".join(f"{x:.2f}" for x in load_before)}', flush=True)
  rows = []
  if 'in_process' not in args.skip:
    rows += in_process(workdir, volumes, args.scratch, args.volumes, args.repeats)
  if 'processes' not in args.skip:
    rows += command_line(workdir, volumes, args.scratch, args.volumes)
  load_after = os.getloadavg()
  print(f'load average after: {" ".join(f"{x:.2f}" for x in load_after)}')
  print()
  print(
    '| setting | volumes | wall s | volumes / min | volumes / min after start-up | CPU s '
    '| read / segment / write s each |'
  )
  print('| --- | ---: | ---: | ---: | ---: | ---: | --- |')
  for r in rows:
    cpu = '' if r['cpu'] is None else f'{r["cpu"]:.0f}'
    steady = '' if r.get('steady') is None else f'{r["steady"]:.2f}'
    stages = ' / '.join(f'{s:.1f}' for s in r['stages'])
    print(
      f'| {r["setting"]} | {r["count"]} | {r["wall"]:.1f} | {60 * r["count"] / r["wall"]:.2f} | '
      f'{steady} | {cpu} | {stages} |'
    )


if __name__ == '__main__':
  main()
