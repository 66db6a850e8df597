"""A checkpoint over the held-out volumes of a split: every case predicted, measured
(`case_metrics.evaluate_case`), drawn (`viz`) and tabulated (`report`) into WORKDIR/eval/<step>/,
written atomically. `python -m imask_jax.evaluate` is the command (evaluate.py); the
contract of what it writes is the command's docstring and docs/evaluation.md."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from data_pipelines import readers
from data_pipelines.atomic import atomic_dir
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.nifti_io import save_nifti
from data_pipelines.tissues import LabelScheme
from imask_jax import metrics
from imask_jax.evaluation import knee_steps, report, viz
from imask_jax.evaluation.case_metrics import evaluate_case, truth_instances
from imask_jax.metrics.thickness import check_method
from imask_jax.models.spec import model_kind

if TYPE_CHECKING:  # imported where used: `--help` answers without JAX and TensorFlow
  from imask_jax.inference import loading
  from imask_jax.inference.whole_volume import VolumePrediction

REFERENCE_RATER = 'reference'  # the default reader (labelsTr/) of a multi-reader dataset


def _safe_name(text: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in text)


def overlay_slice(truth_slices: np.ndarray) -> int:
  """The slice with the most truth foreground (the middle slice of an empty truth)."""
  counts = np.count_nonzero(truth_slices.reshape(truth_slices.shape[0], -1), axis=1)
  return int(np.argmax(counts)) if counts.any() else truth_slices.shape[0] // 2


def rater_name(reader: str) -> str:
  return REFERENCE_RATER if reader == readers.DEFAULT_READER else reader


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationReport:
  """What an evaluation wrote (out_dir) and measured."""

  out_dir: str
  summary: str
  results: tuple[report.CaseResult, ...]
  ap: dict[int, metrics.ClassAP]
  ap_per_case: dict[str, dict[int, metrics.ClassAP]]


PredictFn = Callable[[readers.Volume], 'VolumePrediction']


def evaluate_source(
  config: ml_collections.ConfigDict,
  source: sources.VolumeSource,
  predict: PredictFn,
  out_dir: str,
  header: Mapping[str, Any],
  *,
  progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
  """Evaluates `predict` (volume -> VolumePrediction with instances) on every case of
  `source` and writes the outputs into `out_dir` (replaced as a whole, atomically)."""
  if not source.cases:
    raise ValueError(f'split {source.split!r} has no cases to evaluate')
  scheme = LabelScheme.from_config(config)
  instance_mode = str(config.data.instance_mode)
  thickness_method = check_method(config.eval.thickness_method, 'config eval.thickness_method')
  mask_ap = metrics.MaskAP(
    {c: n for c, n in zip(range(1, len(scheme.class_names) + 1), scheme.class_names)}
  )
  results: list[report.CaseResult] = []
  started = time.time()
  out_dir = os.path.abspath(out_dir)
  with atomic_dir(out_dir) as tmp:
    for index, case in enumerate(source.cases):
      stored = source.load(case, canonical=False)  # OAIZIB-CM's 4 / 5 split, where present
      volume = source.canonical(stored)
      prediction = predict(volume)
      if prediction.instances is None:
        raise ValueError(
          f'case {case.case_id}: the prediction carries no instances; mask AP '
          'needs predict_volume(..., keep_instances=True)'
        )
      save_nifti(
        prediction.label_map,
        volume.grid.affine,
        os.path.join(tmp, 'labels', f'{case.case_id}.nii.gz'),
        like=case.image,
      )
      reader_maps = {}
      if scheme.effusion_value is not None:
        for reader in case.labels:
          other = volume if reader == volume.reader else source.load(case, reader=reader)
          reader_maps[rater_name(reader)] = other.labels
      result = evaluate_case(
        case.case_id,
        volume.labels,
        prediction,
        scheme,
        volume.spacing,
        reader_maps,
        thickness_method=thickness_method,
        side=None
        if scheme.knee is None
        else knee_steps.case_side(case, volume, scheme, stored, source),
        label_split=None if scheme.knee is None else knee_steps.tibial_label_split(stored, source),
      )
      results.append(result)
      stack = readers.slices(volume)
      shape = stack.images.shape[1:]
      for i in range(len(stack)):
        mask_ap.add_slice(
          truth_instances(stack.labels[i], scheme, instance_mode),
          [(d.class_id, d.score, d.full_mask(shape)) for d in prediction.instances[i]],
          shape,
          group=case.case_id,
        )
      _case_figures(os.path.join(tmp, 'figures'), stack, prediction, result, scheme)
      if progress is not None:
        progress(
          f'[{index + 1}/{len(source.cases)}] {case.case_id} ({time.time() - started:.0f} s)'
        )

    ap = mask_ap.evaluate()
    ap_per_case = {r.case_id: mask_ap.evaluate(r.case_id) for r in results}
    report.write_tables(tmp, results, scheme, ap, ap_per_case)
    if scheme.effusion_value is not None:
      _bland_altman_figures(os.path.join(tmp, 'figures'), results)
    summary = report.summary_markdown(
      header, results, scheme, ap, ap_per_case, thickness_method=thickness_method
    )
    report.write_text(os.path.join(tmp, 'summary.md'), summary)
    info = dict(
      header,
      cases=[r.case_id for r in results],
      mask_ap_resolution=report.AP_RESOLUTION,
      instance_mode=instance_mode,
      thickness_method=thickness_method,
      label_values=scheme.names_by_value,
      seconds=round(time.time() - started, 1),
    )
    report.write_text(
      os.path.join(tmp, 'eval.json'), json.dumps(info, indent=1, default=str) + '\n'
    )
  return EvaluationReport(out_dir, summary, tuple(results), ap, ap_per_case)


def _case_figures(
  folder: str,
  stack: readers.SliceStack,
  prediction: VolumePrediction,
  result: report.CaseResult,
  scheme: LabelScheme,
) -> None:
  index = overlay_slice(stack.labels)
  window = viz.display_range(stack.images)
  name = _safe_name(result.case_id)
  viz.save_overlay_figure(
    os.path.join(folder, f'overlay_{name}.png'),
    viz.grey(stack.images[index], window),
    stack.labels[index],
    scheme.to_label_values(prediction.class_slices[index]),
    scheme.names_by_value,
    f'{result.case_id} slice {index} ({stack.plane})',
  )
  for plate, comparison in (result.thickness or {}).items():
    viz.save_thickness_figure(
      os.path.join(folder, f'thickness_{name}_{plate}.png'), comparison, plate, result.case_id
    )
  if result.subregions.get('truth') and result.thickness:
    for source, attribute in (('truth', 'truth'), ('prediction', 'pred')):
      if source in result.subregions:
        maps = {p: getattr(result.thickness[p], attribute) for p in ('femoral', 'tibial')}
        viz.save_subregion_figure(
          os.path.join(folder, f'subregions_{name}_{source}.png'),
          maps,
          result.side,
          f'{result.case_id} {source}',
        )


def _bland_altman_figures(folder: str, results: Sequence[report.CaseResult]) -> None:
  _, pairs = report.agreement(results)
  for (a, b), p in (pairs or {}).items():
    viz.save_bland_altman_figure(
      p.bland_altman,
      os.path.join(folder, f'bland_altman_{_safe_name(a)}_vs_{_safe_name(b)}.png'),
      name_a=a,
      name_b=b,
      unit='mL',
      title=f'Effusion volume: {a} vs {b} (n={len(results)})',
    )


# --- from a workdir -----------------------------------------------------------------------------


def eval_dir(workdir: str, step: int, split: str, config: ml_collections.ConfigDict) -> str:
  """DIR/eval/<step>/ for the config's eval.split, DIR/eval/<step>_<split>/ for another."""
  name = str(step) if split == str(config.eval.split) else f'{step}_{split}'
  return os.path.join(os.path.abspath(workdir), 'eval', name)


def evaluate_workdir(
  workdir: str,
  step: int | None = None,
  split: str | None = None,
  *,
  model: loading.LoadedModel | None = None,
  progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
  """Evaluates checkpoint `step` (latest by default) of `workdir` on `split` (default: the
  config's eval.split). `model`: an already loaded checkpoint of this workdir (saves the
  restore and the compile when evaluating twice in one process)."""
  from imask_jax import workdir as workdir_lib
  from imask_jax.inference import loading, whole_volume

  if model is None:
    model = loading.load_model(workdir, step)
  elif step is not None and int(step) != model.step:
    raise ValueError(
      f'evaluate_workdir: step {step} requested but the model given is step {model.step}'
    )
  config = model.config
  split = split or str(config.eval.split)
  data_dir = workdir_lib.data_dir_for(config, workdir)
  source = sources.volume_source(
    params_lib.params_from_config(config, data_dir), data_dir, split, require_cases=True
  )
  header = {
    'workdir': os.path.abspath(workdir),
    'checkpoint_step': model.step,
    'split': split,
    'dataset': str(config.data.dataset),
    'model_kind': model_kind(config),
    'mask_head': str(config.model.mask_head),
    'backbone': str(config.model.backbone),
    'data_dir': os.path.abspath(data_dir),
    'subject_pattern': str(config.data.get('subject_pattern', '') or ''),
    'split_origin': source.origin,
  }
  return evaluate_source(
    config,
    source,
    lambda volume: whole_volume.predict_volume(model, volume, keep_instances=True),
    eval_dir(workdir, model.step, split, config),
    header,
    progress=progress,
  )
