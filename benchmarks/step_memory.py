"""XLA's buffer plan of the trainer's step, with and without backbone rematerialisation.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/step_memory.py
  ... benchmarks/step_memory.py --config experiments/oai.py --size 1024 --batch 1
  ... benchmarks/step_memory.py --config experiments/phantom_knee.py --variants off on --time 5

For each variant of `model.remat` ('off', 'on') the script compiles the trainer's step
(`gpu.compiled_train_step`: the experiment's config, a synthetic batch of its input shapes)
ahead of time, without running it, and prints what XLA planned (`compiled.memory_analysis()`,
GiB): the arguments (parameters, optimizer state, batch), the outputs, and the temporaries
(every buffer the step allocates while it runs: activations kept for the backward pass,
gradients, scratch). On the CPU the step's peak is about arguments + temporaries (its outputs
reuse the donated state). With `--time N` it also runs every variant N times, alternately,
and prints the median seconds per step, so the price of the recompute sits beside what it
saves.

With `--breakdown N` it also says where the plan's peak is: XLA dumps its buffer plan
(`--xla_dump_to`, the trainer's step only), and the buffers alive at the peak are summed by
the op that made them, cut to N levels of their name (e.g. 4: `jvp(MaskRCNN.losses)/
MaskRCNN.pyramid/backbone/body`; `copy` and other unnamed ops by kind), largest first.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import tempfile
import time

import gpu  # benchmarks/gpu.py: the experiment's config and a synthetic training batch

GIB = 2.0**30


def peak_breakdown(dump_dir: str, depth: int) -> list[tuple[float, int, str]]:
  """(GiB, buffers, group) of the buffers alive at the plan's peak, largest first, from the
  newest `*per_device*-live-range.txt` in `dump_dir` (XLA's "Stack trace breakdown for peak
  usage"). Empty when the dump has no such section (another XLA version)."""
  files = sorted(
    glob.glob(os.path.join(dump_dir, '*per_device*live-range.txt')), key=os.path.getmtime
  )
  if not files:
    return []
  lines = open(files[-1]).read().split('\n')
  starts = [i for i, line in enumerate(lines) if 'Stack trace breakdown for peak usage' in line]
  if not starts:
    return []
  sizes: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  top = re.compile(r'^      [├└]── (.*) \(([0-9.]+)%, total: ([0-9 ]+) bytes')
  for line in lines[starts[0] + 2 :]:
    match = top.match(line)
    if not match:
      continue
    name, total = match.group(1), int(match.group(3).replace(' ', ''))
    if name.startswith('jit('):
      group = '/'.join(name.split('/')[1:depth])
    elif name == 'state':
      group = 'state (parameters, optimizer)'
    else:
      group = re.sub(r'[.0-9]+$', '', name)
    sizes[group] += total
    counts[group] += 1
  return [(size / GIB, counts[group], group) for group, size in sizes.most_common()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/oai.py')
  parser.add_argument('--size', type=int, default=0, help="input side (0: the config's)")
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--backbone', default='')
  parser.add_argument('--variants', nargs='+', choices=('off', 'on'), default=['off', 'on'])
  parser.add_argument('--time', type=int, default=0, help='timed steps per variant (0: none)')
  parser.add_argument(
    '--breakdown', type=int, default=0, help="group the peak's buffers to this name depth"
  )
  parser.add_argument('--top', type=int, default=15, help='groups shown by --breakdown')
  args = parser.parse_args()
  dump_root = None
  if args.breakdown:
    # Before jax starts its backend, which reads XLA_FLAGS once.
    dump_root = tempfile.mkdtemp(prefix='step_memory_')
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_dump_to={dump_root} --xla_dump_hlo_module_re=.*per_device.*'
    )

  import jax

  from imask_jax import sweep

  path, _, arg = args.config.partition(':')
  probe = sweep.load_experiment(path, arg)
  size = args.size or int(probe.data.image_size[0])
  run = {'config': args.config, 'size': size, 'backbone': args.backbone, 'batch': args.batch}
  print(
    f'{args.config}: {probe.model.backbone if not args.backbone else args.backbone}, '
    f'{probe.model.mask_head} head, {args.batch} x {size} x {size}, devices {jax.device_count()}'
  )
  print('| remat | compile s | arguments GiB | outputs GiB | temporaries GiB | args + temps GiB |')
  print('| --- | ---: | ---: | ---: | ---: | ---: |')
  variants = {}
  breakdowns = {}
  for name in args.variants:
    config = gpu.load_config(run)
    config.model.remat = name == 'on'
    compiled, state, batch, compile_s = gpu.compiled_train_step(config, args.batch, size)
    plan = compiled.memory_analysis()
    arguments = plan.argument_size_in_bytes / GIB
    temporaries = plan.temp_size_in_bytes / GIB
    print(
      f'| {name} | {compile_s:.1f} | {arguments:.2f} | {plan.output_size_in_bytes / GIB:.2f} | '
      f'{temporaries:.2f} | {arguments + temporaries:.2f} |',
      flush=True,
    )
    variants[name] = {'compiled': compiled, 'state': state, 'batch': batch, 'times': []}
    if dump_root:
      breakdowns[name] = peak_breakdown(dump_root, args.breakdown)
  if dump_root:
    shutil.rmtree(dump_root, ignore_errors=True)
  for name, groups in breakdowns.items():
    print(f"\nremat {name}: buffers alive at the plan's peak, by the op that made them")
    if not groups:
      print('(no peak breakdown in the dump: another XLA version?)')
    print('| GiB | buffers | made by |')
    print('| ---: | ---: | --- |')
    for size, count, group in groups[: args.top]:
      print(f'| {size:.3f} | {count} | {group} |')
  if not args.time:
    return
  for v in variants.values():  # one untimed call each
    v['state'], metrics = v['compiled'](v['state'], v['batch'])
    jax.block_until_ready(metrics)
  for _ in range(args.time):
    for v in variants.values():
      start = time.perf_counter()
      v['state'], metrics = v['compiled'](v['state'], v['batch'])
      jax.block_until_ready(metrics)
      v['times'].append(time.perf_counter() - start)
  first = statistics.median(next(iter(variants.values()))['times'])
  print('| remat | median s per step | x first |')
  print('| --- | ---: | ---: |')
  for name, v in variants.items():
    median = statistics.median(v['times'])
    print(f'| {name} | {median:.3f} | {median / first:.2f} |')


if __name__ == '__main__':
  main()
