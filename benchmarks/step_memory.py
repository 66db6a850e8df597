"""XLA's buffer plan of the trainer's step, with and without backbone rematerialisation.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/step_memory.py
  ... benchmarks/step_memory.py --config experiments/oai.py --size 1024 --batch 1
  ... benchmarks/step_memory.py --config experiments/phantom_knee.py --variants off on --time 5
  ... benchmarks/step_memory.py --config experiments/oai.py:oaizib_cm,practical --batch 8 --flops

For each variant of `model.remat` ('off', 'on') the script compiles the trainer's step
(`gpu.compiled_train_step`: the experiment's config, a synthetic batch of its input shapes)
ahead of time, without running it, and prints what XLA planned (`compiled.memory_analysis()`,
GiB): the arguments (parameters, optimizer state, batch), the outputs, and the temporaries
(every buffer the step allocates while it runs: activations kept for the backward pass,
gradients, scratch). On the CPU the step's peak is about arguments + temporaries (its outputs
reuse the donated state). With `--time N` it also runs every variant N times, alternately,
and prints the median seconds per step, so the price of the recompute sits beside what it
saves.

With `--flops` it also prints the step's floating-point operations per variant, from XLA's
cost analysis (`cost_analysis()['flops']`: 2 per multiply-add of every convolution and matrix
product, 1 per element of the elementwise ops). That analysis counts a loop's body once,
whatever its trip count, and `ops.conv` takes a 3 x 3 kernel's gradient as a scan over its
taps; so the count comes from the step lowered (not compiled: seconds) with every kernel
gradient on lax's own rule (`ops.conv.MIN_CHANNEL_PRODUCT` raised), the same arithmetic with
no loop. The compiled step's own count is printed beside it, smaller by the taps it skips.
Still counted once: the ROIAlign's scan steps and the NMS loops (bilinear taps and box
overlaps: small beside the convolutions; docs/training_cost.md has the counts).

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


def cost_flops(stage) -> float:
  """XLA's cost-analysis FLOPs of a lowered or compiled computation (0 where not reported)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0))


def step_flops(config, batch_size: int, size: int) -> float:
  """FLOPs of the trainer's step for `config` (module docstring, `--flops`): the step of
  `gpu.compiled_train_step` lowered with every kernel gradient on lax's rule, no scan."""
  from imask_jax import parallel
  from imask_jax.models import build
  from imask_jax.ops import conv as conv_ops
  from imask_jax.training import optim
  from imask_jax.training import steps as steps_lib

  saved = conv_ops.MIN_CHANNEL_PRODUCT
  conv_ops.MIN_CHANNEL_PRODUCT = float('inf')  # read at trace time by prefers_product
  try:
    mesh = parallel.data_mesh()
    model = build.build_model(config, batch_stats_axis=parallel.DATA_AXIS)
    tx = optim.make_optimizer(config.train)
    seed = int(config.seed)
    state = parallel.replicate(steps_lib.init_state(model, tx, seed), mesh)
    host_batch = gpu.training_batch(config, batch_size, size)
    batch = parallel.shard_batch({k: host_batch[k] for k in steps_lib.MODEL_INPUT_KEYS}, mesh)
    step = steps_lib.make_train_step(
      model, tx, mesh, seed, optim.learning_rate_schedule(config.train)
    )
    return cost_flops(step.lower(state, batch))
  finally:
    conv_ops.MIN_CHANNEL_PRODUCT = saved


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
  parser.add_argument(
    '--flops', action='store_true', help="also print the step's FLOPs (XLA's cost analysis)"
  )
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

  from imask_jax import configs

  path, _, arg = args.config.partition(':')
  probe = configs.load_experiment(path, arg)
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
    if args.flops:
      start = time.perf_counter()
      counted = step_flops(config, args.batch, size)
      print(
        f'remat {name}: {counted / 1e9:.1f} GFLOP per step (lowered with lax kernel gradients, '
        f'{time.perf_counter() - start:.0f} s; the compiled step counts '
        f'{cost_flops(compiled) / 1e9:.1f}, each scan body once)',
        flush=True,
      )
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
