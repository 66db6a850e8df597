"""A workdir's model ready for inference, and an unlabelled scan ready for it.

  checkpoint + config.json  --load_model-->  LoadedModel (variables, the jitted detection or
                                             segmentation program, batch size)
  a NIfTI file or DICOM folder  --load_image-->  Volume (canonical RAS+)

`whole_volume.predict_volume` runs a LoadedModel over a Volume.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from data_pipelines import readers
from data_pipelines.errors import DataError
from data_pipelines.tissues import LabelScheme
from imask_jax import errors, parallel
from imask_jax import workdir as workdir_lib
from imask_jax.inference import postprocess, programs
from imask_jax.metrics.thickness import check_method
from imask_jax.models import build, spec


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A restored checkpoint ready for inference.

  detect: jit(shard_map) of (variables, images [B, H, W, C]) -> per-example detections
  (`programs.make_detect_fn`; with paint_only, only the detections that paint label maps:
  `MaskRCNN.detect`); batch_size: B, the config's eval.batch_size (a multiple of the
  device count); step: the checkpoint's training step.
  """

  workdir: str
  config: ml_collections.ConfigDict
  scheme: LabelScheme
  step: int
  variables: Any
  detect: Any
  mesh: jax.sharding.Mesh
  batch_size: int

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(n) for n in self.config.data.image_size)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the checkpoints stored in `workdir`/checkpoints (sorted)."""
  folder = os.path.join(os.fspath(workdir), 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(
    int(name)
    for name in os.listdir(folder)
    if name.isdigit() and os.path.isdir(os.path.join(folder, name))
  )


def load_model(
  workdir: str | os.PathLike, step: int | None = None, *, paint_only: bool = False
) -> LoadedModel:
  """Reads `workdir`/config.json and restores checkpoint `step` (default: the latest).

  paint_only: with model.paint_slots_per_class > 0, the mask head runs only on the detections
  that paint label maps (`MaskRCNN.detect`): the label maps are the same as long as no class
  has more of them in a slice than its slots (`VolumePrediction.unpainted_detections`), but the
  instances lack the low-scoring detections that mask AP ranks. For predict, not evaluate.
  One process only: evaluation and prediction read whole volumes on the host that runs them.
  """
  workdir = os.fspath(workdir)
  if jax.process_count() > 1:
    raise RuntimeError(
      f'inference runs on one process; this is process {jax.process_index()}'
      f' of {jax.process_count()}'
    )
  config = workdir_lib.load_config(workdir)
  scheme = LabelScheme.from_config(config)
  postprocess.check_rules(scheme, config.model)
  check_method(config.eval.thickness_method, 'config eval.thickness_method')
  spec.mask_threshold(config)
  paint_only = paint_only and spec.paint_slots_per_class(config) > 0
  steps = checkpoint_steps(workdir)
  if not steps:
    raise errors.MissingCheckpointError(
      f'{os.path.join(workdir, "checkpoints")}: no checkpoint (train first with python -m '
      f'imask_jax.main --workdir {workdir})'
    )
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise errors.MissingCheckpointError(
      f'{os.path.join(workdir, "checkpoints")}: no checkpoint at step {step}; stored steps: {steps}'
    )
  mesh = parallel.data_mesh()
  batch_size = _eval_batch_size(config)
  model = build.build_model(config)
  # The restore template only needs shapes and dtypes: trace the initialisation, don't run it.
  template = jax.eval_shape(
    functools.partial(build.init_variables, model), jax.random.PRNGKey(int(config.seed))
  )
  manager = workdir_lib.checkpoint_manager(workdir, config)
  try:
    variables = workdir_lib.restore_variables(manager, template, mesh, int(step))
  except errors.CheckpointError as error:
    others = [s for s in steps if s != int(step)]
    raise errors.CheckpointError(
      f'{error}'
      + (f' (other stored steps: {others}; choose one with --checkpoint STEP)' if others else '')
    ) from error
  finally:
    manager.close()
  return _loaded(workdir, config, int(step), model, variables, mesh, batch_size, paint_only)


def initialised_model(
  config: ml_collections.ConfigDict, *, paint_only: bool = False
) -> LoadedModel:
  """The config's model freshly initialised (seed config.seed), assembled as load_model
  assembles a restored one (paint_only as there): for tests and benchmarks that need the real
  network without a checkpoint. Its workdir is '' and its step 0."""
  mesh = parallel.data_mesh()
  batch_size = _eval_batch_size(config)
  model = build.build_model(config)
  init = jax.jit(functools.partial(build.init_variables, model))
  variables = parallel.replicate(jax.device_get(init(jax.random.PRNGKey(int(config.seed)))), mesh)
  paint_only = paint_only and spec.paint_slots_per_class(config) > 0
  return _loaded('', config, 0, model, variables, mesh, batch_size, paint_only)


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  batch_size = int(config.eval.batch_size)
  if batch_size < 1 or batch_size % jax.device_count():
    raise ValueError(
      f'config eval.batch_size={batch_size} must be a positive multiple of the '
      f'device count ({jax.device_count()})'
    )
  return batch_size


def _loaded(workdir, config, step, model, variables, mesh, batch_size, paint_only) -> LoadedModel:
  return LoadedModel(
    workdir=workdir,
    config=config,
    scheme=LabelScheme.from_config(config),
    step=step,
    variables=variables,
    detect=programs.make_detect_fn(model, mesh, paint_only),
    mesh=mesh,
    batch_size=batch_size,
  )


def load_image(
  path: str | os.PathLike,
  plane: str,
  case_id: str | None = None,
  *,
  allow_missing_pose: bool = False,
) -> readers.Volume:
  """An unlabelled scan, a NIfTI file or a DICOM series folder, as a canonical `Volume` to be
  sliced along `plane`; a NIfTI file without its scanner pose is refused unless
  `allow_missing_pose` (readers.load_image_file)."""
  path = os.fspath(path)
  if case_id is None:
    case_id = os.path.basename(os.path.normpath(path))
    for suffix in ('.nii.gz', '.nii'):
      if case_id.endswith(suffix):
        case_id = case_id[: -len(suffix)]
  volume = readers.load_volume(
    readers.Case(case_id, path),
    plane=plane,
    label_values=None,
    allow_missing_pose=allow_missing_pose,
  )
  if min(volume.image.shape) < 1:
    raise DataError(path, 'image has an empty axis', found=volume.image.shape)
  return volume
