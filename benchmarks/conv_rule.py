"""Which convolutions should take the matrix-product kernel gradient: whole training steps.

Run (from the repository root):
  TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/conv_rule.py
  ... benchmarks/conv_rule.py --config experiments/phantom_knee.py --min_products inf 8192 0

`imask_jax.ops.conv` takes a convolution's kernel gradient as a matrix product where
`ops.conv.prefers_product` says so (1 x 1 kernels, and in x out channels of at least
`MIN_CHANNEL_PRODUCT`), else keeps XLA's own rule. The rule is read when a step is traced, so
this script compiles the trainer's step (`steps.make_train_step`, as in benchmarks/gpu.py: the
experiment's config, a synthetic batch of its input shapes) once per variant in `--rules`
('lax': XLA's rule for every conv; 'all': the product for every conv the op accepts; a number
N: the module's rule with MIN_CHANNEL_PRODUCT = N) and times the variants alternately, call
by call, in the same process on the same cores: medians of `--repeats` steps after
`--warmup`, and each variant's ratio to the first one. (`layers.UpConv2x2` is a product in
every variant.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import gpu  # benchmarks/gpu.py: the experiment's config and a synthetic training batch


def compiled_step(config, rule: str, batch_size: int, size: int):
  """(compiled step, its own train state, device batch, compile s) under one rule."""
  from imask_jax.ops import conv as conv_ops

  module_rule, module_min = conv_ops.prefers_product, conv_ops.MIN_CHANNEL_PRODUCT
  if rule == 'lax':
    conv_ops.prefers_product = lambda kernel_shape: False
  elif rule == 'all':
    conv_ops.prefers_product = lambda kernel_shape: True
  else:
    conv_ops.MIN_CHANNEL_PRODUCT = int(rule)
  try:  # the rule is read while the step is traced
    return gpu.compiled_train_step(config, batch_size, size)
  finally:
    conv_ops.prefers_product, conv_ops.MIN_CHANNEL_PRODUCT = module_rule, module_min


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/phantom_knee.py')
  parser.add_argument('--size', type=int, default=0, help="input side (0: the config's)")
  parser.add_argument('--batch', type=int, default=0, help="batch (0: the config's)")
  parser.add_argument('--backbone', default='')
  parser.add_argument('--rules', nargs='+', default=['lax', str(64 * 128), 'all'])
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=15)
  args = parser.parse_args()

  import jax

  from imask_jax import configs
  from imask_jax.ops import conv as conv_ops

  path, _, arg = args.config.partition(':')
  probe = configs.load_experiment(path, arg)
  size = args.size or int(probe.data.image_size[0])
  batch = args.batch or int(probe.train.batch_size)
  config = gpu.load_config(
    {'config': args.config, 'size': size, 'backbone': args.backbone, 'batch': batch}
  )
  default = conv_ops.MIN_CHANNEL_PRODUCT
  variants = []
  for rule in args.rules:
    compiled, state, device_batch, compile_s = compiled_step(config, rule, batch, size)
    variants.append(
      {
        'rule': rule,
        'fn': compiled,
        'state': state,
        'batch': device_batch,
        'compile_s': compile_s,
        'times': [],
      }
    )
  for round_ in range(args.warmup + args.repeats):
    for v in variants:
      start = time.perf_counter()
      v['state'], metrics = jax.block_until_ready(v['fn'](v['state'], v['batch']))
      if round_ >= args.warmup:
        v['times'].append(time.perf_counter() - start)
  print(
    f'{args.config} at {batch} x {size} x {size}, medians of {args.repeats} steps '
    f'(after {args.warmup}), alternating; module MIN_CHANNEL_PRODUCT {default}'
  )
  print('| rule | compile s | median ms | min ms | x first row |')
  print('| --- | ---: | ---: | ---: | ---: |')
  base = statistics.median(variants[0]['times'])
  for v in variants:
    med = statistics.median(v['times'])
    print(
      f'| {v["rule"]} | {v["compile_s"]:.1f} | {1e3 * med:.0f} | '
      f'{1e3 * min(v["times"]):.0f} | {med / base:.2f} |'
    )


if __name__ == '__main__':
  main()
