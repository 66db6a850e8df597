"""A workdir's model to share: its config and one checkpoint holding only the network's
variables (params and, with batch norm, batch_stats), without the optimiser's state, which
inference never reads (Adam's two moments make a training checkpoint about three times the
size of the variables).

  python -m imask_jax.inference.export --workdir RUN --out DIR [--checkpoint STEP]

`predict --workdir DIR` and `evaluate --workdir DIR` read DIR as they read RUN, the variables
bit for bit the same; training cannot resume from DIR (it holds no optimiser state).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

# What a shared model keeps beside its checkpoint: the settings, the training curve, and the
# reference predict's quality flags compare scans with (predict/quality.py).
KEPT_FILES = ('config.json', 'metrics.jsonl', 'training_reference.json')


def export_model(workdir: str, out: str, step: int | None = None) -> int:
  """Writes `out` (which must not exist or be empty) from checkpoint `step` of `workdir`
  (default: the latest) and returns the step. Written into `out`.partial first and renamed
  when complete, so an interrupted export leaves no folder that looks like a model."""
  import jax
  import orbax.checkpoint as ocp

  from imask_jax.inference import loading

  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f'{out}: exists and is not an empty folder; choose a new --out')
  model = loading.load_model(workdir, step)
  variables = jax.device_get(model.variables)
  partial = os.path.abspath(out).rstrip(os.sep) + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  for name in KEPT_FILES:
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copy2(os.path.join(workdir, name), os.path.join(partial, name))
  # The layout training writes (one 'state' item per step folder), without its best-step
  # bookkeeping: one checkpoint, no validation metrics to rank it by.
  manager = ocp.CheckpointManager(
    os.path.join(partial, 'checkpoints'),
    options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    item_names=('state',),
  )
  try:
    manager.save(model.step, args=ocp.args.Composite(state=ocp.args.StandardSave(variables)))
    manager.wait_until_finished()
  finally:
    manager.close()
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.rename(partial, out)
  return model.step


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.inference.export', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='a training workdir')
  parser.add_argument('--out', required=True, help='a new folder for the shared model')
  parser.add_argument('--checkpoint', type=int, default=None, help='step (default: the latest)')
  args = parser.parse_args(argv)
  from imask_jax import errors

  try:
    step = export_model(args.workdir, args.out, args.checkpoint)
  except (FileExistsError, *errors.USER_ERRORS) as error:
    # One line: no workdir, no such checkpoint, one that cannot be restored, --out taken.
    print(f'{parser.prog}: {type(error).__name__}: {error}', file=sys.stderr)
    return errors.EXIT_REFUSED
  print(f'{args.out}: the variables of step {step} of {args.workdir}')
  return errors.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
