"""A run's folder: its resolved config, its dataset location and its checkpoints.

Layout of a workdir (written by the trainer, read by evaluation, prediction and sweeps):

  config.json       the resolved config (train.steps made concrete; `load_config` reads it
                    back with tuples intact, new fields taking their defaults)
  checkpoints/      orbax CheckpointManager: the latest `train.keep_checkpoints` steps and the
                    best by `train.best_metric` (validation Dice); `manager.best_step()` names it
  metrics.jsonl     one JSON object per logged step and per validation (run_log.py)
  tensorboard/      losses, learning rate, step time, slices/s, validation Dice and overlays

This module knows the folder and nothing of the training loop, so everything that loads a
trained model goes through it rather than through the trainer.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as ocp_policy

from data_pipelines import tissues
from data_pipelines.atomic import atomic_path
from data_pipelines.datasets import params as dataset_params
from imask_jax import configs, parallel
from imask_jax.errors import (
  CheckpointError,
  DataMissingError,
  MissingCheckpointError,
  NotAWorkdirError,
  SettingsChangedError,
)

DOCS_DATA = 'docs/data.md'


UNRESTORABLE_DIR = 'checkpoints_unrestorable'  # where training sets a broken checkpoint aside


# --- config --------------------------------------------------------------------------------------


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use (recursively; dicts stay dicts)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (process 0; atomic). A resumed run
  with different settings overwrites it and says which fields changed."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    changed = changed_fields(load_config(workdir).to_dict(), config.to_dict())
    if changed:
      logging.warning('%s: this run changes %s', path, '; '.join(changed))
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2))


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = '') -> list[str]:
  """'path: old -> new' for every field of two config dicts that differs (tuples = lists)."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += changed_fields(a, b, f'{prefix}{key}.')
    elif _tuples(a) != _tuples(b):
      out.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return out


# Settings a checkpoint's arrays depend on: a run may resume only if these are unchanged.
STATE_SHAPING_FIELDS = (
  'model',
  'data.image_size',
  'data.context_slices',
  'train.optimizer',
  'train.grad_clip_norm',
  'train.weight_decay',
)
# Fields under those that only shape how detections become label maps: a run may resume with
# new values (older workdirs then pick up a new painting rule, for instance).
INFERENCE_ONLY_FIELDS = (
  'model.test_score_threshold',
  'model.test_nms_threshold',
  'model.max_detections',
  'model.rpn_pre_nms_topk_test',
  'model.rpn_post_nms_topk_test',
  'model.label_score_threshold',
  'model.mask_threshold',
  'model.paint_rule',
  'model.unet.sliding_window',
  'model.unet.window_overlap',
  'model.unet.window_gaussian',
  'model.paint_slots_per_class',
  'model.keep_largest_component',
  'model.keep_largest_cluster',
  'model.cluster_radius_mm',
  'model.cluster_per_side',
  'model.cluster_min_ml',
  'model.keep_attached',
  'model.attach_radius_mm',
)


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints were made with another model or optimiser
  (restoring them would fail deep inside orbax, or silently misfit)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')) or not os.path.exists(
    os.path.join(workdir, 'config.json')
  ):
    return
  old, new = load_config(workdir).to_dict(), config.to_dict()

  def get(tree, path):
    for part in path.split('.'):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return tree

  changed = []
  for path in STATE_SHAPING_FIELDS:
    a, b = get(old, path), get(new, path)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += changed_fields(a, b, path + '.')
    elif _tuples(a) != _tuples(b):
      changed.append(f'{path}: {a!r} -> {b!r}')
  changed = [c for c in changed if c.split(':')[0] not in INFERENCE_ONLY_FIELDS]
  if changed:
    raise SettingsChangedError(
      f'{workdir}: its checkpoints were trained with other settings '
      f'({"; ".join(changed)}); resume with the settings of '
      f'{os.path.join(workdir, "config.json")} or start a new workdir'
    )


def _merged(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  """`saved` with every field it lacks taken from `defaults` (nested dicts merged)."""
  out = dict(defaults)
  for key, value in saved.items():
    base = defaults.get(key)
    out[key] = _merged(base, value) if isinstance(value, dict) and isinstance(base, dict) else value
  return out


# Fields whose default for new runs is not the behaviour of workdirs saved before the field
# existed: such a workdir gets the value it ran with, so it evaluates and predicts as before.
LEGACY_VALUES = {
  'model': {'paint_rule': 'each'},
  'eval': {'thickness_method': 'nearest'},
  # an nnU-Net folder's imagesTs/ + labelsTs/ were never read as the test split before
  'data': {'official_test': False},
}
# Fields a config no longer holds because their value follows from another: a workdir saved
# with one keeps loading (and resuming) if the value agrees, and is refused if not.
RETIRED_FIELDS = {
  'model': ('num_classes',),  # one class per data.class_names (tissues.LabelScheme.from_config)
}


def with_added_fields(saved: dict[str, Any]) -> dict[str, Any]:
  """A config dict saved by an older version with every field added since: its LEGACY_VALUES
  entry, else its default."""
  return _merged(_merged(configs.default_config().to_dict(), LEGACY_VALUES), saved)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run wrote into `workdir`, equal to the one it ran with (JSON
  lists are turned back into tuples). Fields added to `configs.default_config()` after the
  run was made take their LEGACY_VALUES or else their defaults, so older workdirs still
  evaluate, predict and resume as they did."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise NotAWorkdirError(
      f'{path}: no config.json in the workdir; is {workdir!r} a '
      'training workdir (made by python -m imask_jax.main)?'
    )
  with open(path) as f:
    saved = json.load(f)
  config = ml_collections.ConfigDict(_tuples(with_added_fields(saved)))
  retired = [(g, n) for g, names in RETIRED_FIELDS.items() for n in names if n in config[g]]
  if retired:
    try:
      tissues.LabelScheme.from_config(config)
    except ValueError as error:
      raise SettingsChangedError(f'{path}: {error}') from error
    for group, name in retired:
      del config[group][name]
  return config


# --- data ----------------------------------------------------------------------------------------


def data_dir_for(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where TFDS datasets live: data.data_dir, else $IMASK_DATA_DIR, else beside the workdir
  (so the runs of a sweep share one prepared dataset)."""
  if config.data.data_dir:
    return config.data.data_dir
  return os.environ.get('IMASK_DATA_DIR') or os.path.join(
    os.path.dirname(os.path.abspath(workdir.rstrip('/'))), 'tfds'
  )


# What a raw folder must hold before a build is worth starting (the builders check the rest).
RAW_LAYOUT = {
  'oai_zib': ('images', 'segmentation_masks'),
  'nifti_folder': ('dataset.json', 'imagesTr'),
}


def check_raw_data(config: ml_collections.ConfigDict, data_dir: str) -> None:
  """Raises DataMissingError when a manual dataset (oai_zib, nifti_folder) is neither built in
  `data_dir` nor present in its raw folder; cheap (a few stat calls), so runs first."""
  params = dataset_params.params_from_config(config, data_dir)
  if params.is_phantom:
    return
  from data_pipelines.datasets import builders  # imports TensorFlow; not needed for phantoms

  builder = builders.builder_for(config, data_dir)
  if builder.is_prepared():
    return
  missing = [
    name
    for name in RAW_LAYOUT[params.dataset]
    if not os.path.exists(os.path.join(params.source_dir, name))
  ]
  if not missing:
    return
  where = (
    f'config data.manual_dir={config.data.manual_dir!r}'
    if config.data.manual_dir
    else 'where an empty config data.manual_dir points: <data_dir>/downloads/manual'
  )
  phantom = 'phantom_hip' if tissues.EFFUSION in tuple(config.data.class_names) else 'phantom_knee'
  layout = textwrap.dedent(builders.BUILDERS[params.dataset].MANUAL_DOWNLOAD_INSTRUCTIONS)
  raise DataMissingError(
    f'{params.source_dir}: no {params.dataset} data (missing {", ".join(missing)}); this is '
    f'{where}. Put the data there or name its folder with --config.data.manual_dir=PATH.\n'
    f'{layout.rstrip()}\n'
    f'How to obtain and prepare the data: {DOCS_DATA}.\n'
    f'To try the pipeline without any data, train on generated phantoms:\n'
    f'  python -m imask_jax.main --config experiments/{phantom}.py --workdir runs/{phantom}\n'
    f'  (or experiments/{phantom}.py:smoke for a one-minute check)'
  )


def prepare_dataset(config: ml_collections.ConfigDict, data_dir: str):
  """Builds the stored dataset if needed and returns its TFDS builder. Process 0 builds first
  and the others wait for it, so processes sharing a disk never build the same files at once
  (on separate disks each builds its own copy after the barrier)."""
  from data_pipelines.datasets import builders

  builder = builders.prepare(config, data_dir) if jax.process_index() == 0 else None
  parallel.sync_processes('imask_jax: dataset prepared by process 0')
  if builder is None:
    builder = builders.prepare(config, data_dir)
  parallel.sync_processes('imask_jax: dataset prepared everywhere')
  return builder


# --- checkpoints ---------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the latest `train.keep_checkpoints` steps and the best one by `train.best_metric`
  (higher is better). `best_fn` is set as well as the policy: only then does orbax write each
  step's metrics to disk, so the best step is still known (and kept) after a restart, and
  `manager.best_step()` answers."""
  metric = str(config.train.best_metric)

  def score(metrics: dict[str, Any]) -> float:
    value = float(metrics.get(metric, -math.inf))  # NaN: nothing to measure, never the best
    return value if math.isfinite(value) else -math.inf

  policy = ocp_policy.AnyPreservationPolicy(
    [
      ocp_policy.LatestN(n=int(config.train.keep_checkpoints)),
      ocp_policy.BestN(
        get_metric_fn=score, reverse=False, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=score,
    best_mode='max',
    create=True,
    enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options, item_names=('state',)
  )


def checkpoint_folder(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(int(step)))


def _metadata_problem(folder: str) -> str | None:
  """The first JSON metadata file of a checkpoint folder that does not parse, if any (orbax
  would fail on it with a JSON error that names no file)."""
  for name in ('_CHECKPOINT_METADATA', os.path.join('state', '_METADATA')):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding='utf-8') as f:
        json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
      return f'{name} is not valid JSON ({error})'
  return None


def _root_cause(error: BaseException) -> str:
  """The innermost cause's first line (orbax wraps TensorStore's precise message in a
  generic one that prints the whole array spec), at most 300 characters."""
  while error.__cause__ is not None or (
    error.__context__ is not None and not error.__suppress_context__
  ):
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  line = lines[0]
  return line if len(line) <= 300 else line[:297] + '...'


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, restore) -> Any:
  """`restore(step)`, or a CheckpointError whose one line names the step's folder and the
  problem: a metadata file that is not valid JSON, or the innermost error of the restore (a
  truncated data file shows as TensorStore's "byte range ... is not valid for value of size")."""
  folder = checkpoint_folder(manager, step)
  problem = _metadata_problem(folder)
  if problem is None:
    try:
      return restore(int(step))
    except Exception as error:  # noqa: BLE001 -- named in one line; the cause is chained
      raise CheckpointError(
        f'checkpoint {folder}: cannot be restored: {_root_cause(error)}'
      ) from error
  raise CheckpointError(f'checkpoint {folder}: cannot be restored: {problem}')


def set_aside(folder: str, workdir: str) -> str:
  """Moves a checkpoint folder to <workdir>/checkpoints_unrestorable/<step>[.<n>] (never
  deletes it: it may still be repaired or inspected); returns the new path."""
  target_dir = os.path.join(workdir, UNRESTORABLE_DIR)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, os.path.basename(folder))
  n = 0
  while os.path.lexists(target):
    n += 1
    target = os.path.join(target_dir, f'{os.path.basename(folder)}.{n}')
  os.replace(folder, target)
  return target


def restore_state(
  manager: ocp.CheckpointManager, template: Any, mesh, step: int | None = None
) -> Any:
  """Checkpoint `step` replicated on this run's devices, whatever device count saved it.
  template: a TrainState of arrays or ShapeDtypeStructs (shapes and dtypes).

  step None (resuming training): the newest checkpoint that restores. Newer ones that cannot
  be restored (a truncated or corrupt file) are moved to <workdir>/checkpoints_unrestorable/
  and named in a warning; if none restores, nothing is moved and the newest one's problem is
  raised (CheckpointError), since then the cause is more likely the settings than the files.
  With several processes a broken checkpoint is reported, not moved (the processes would have
  to agree on it): move it yourself and start again.
  """
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
  )

  def restore(s: int) -> Any:
    state = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    # Copied into buffers of the runtime's own: orbax's arrays may alias its read buffers, and a
    # donating train step cannot update those in place (see parallel.replicate).
    return jax.tree.map(lambda x: jax.device_put(x, sharding, may_alias=False), state['state'])

  if step is not None:
    return restore_checkpoint(manager, int(step), restore)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise MissingCheckpointError(f'{manager.directory}: no checkpoint to restore')
  failed: list[CheckpointError] = []
  for candidate in steps:
    try:
      state = restore_checkpoint(manager, candidate, restore)
    except CheckpointError as error:
      if jax.process_count() > 1:
        raise CheckpointError(
          f'{error} (with several processes it is not set aside: move it '
          f'out of {manager.directory} and start again)'
        ) from error
      failed.append(error)
      continue
    if failed:
      workdir = os.path.dirname(os.fspath(manager.directory).rstrip(os.sep))
      for bad_step, error in zip(steps, failed):
        moved = set_aside(checkpoint_folder(manager, bad_step), workdir)
        logging.warning(
          '%s; moved to %s; resuming from the checkpoint of step %d', error, moved, candidate
        )
      manager.reload()
    return state
  raise CheckpointError(
    f'{failed[0]} (no older checkpoint restores either: {steps[1:] or "none"}; nothing was moved)'
  ) from failed[0]


def restore_variables(
  manager: ocp.CheckpointManager, template: dict[str, Any], mesh, step: int
) -> dict[str, Any]:
  """The model variables of checkpoint `step` ({'params'} and, with batch norm,
  {'batch_stats'}), replicated on this run's devices, without reading the optimiser state: a
  model for inference needs no optimiser. template: the variables' shapes and dtypes
  (`jax.eval_shape` of the model's init)."""
  sharding = parallel.replicated(mesh)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    {k: v for k, v in template.items() if jax.tree.leaves(v)},
  )
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)

  def restore(s: int) -> dict[str, Any]:
    return dict(
      manager.restore(
        s,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        ),
      )['state']
    )

  return restore_checkpoint(manager, int(step), restore)
