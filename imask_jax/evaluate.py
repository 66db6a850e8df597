"""Checkpoint-based evaluation: whole held-out volumes -> metrics, paper-style tables, figures.

  python -m imask_jax.evaluate --workdir DIR [--checkpoint STEP] [--split test]

Reads DIR/config.json, restores the checkpoint (latest by default), segments every volume of
the split slice by slice (`whole_volume.predict_volume`), puts the label maps back on each file's
grid, and measures them against the truth (the config's reader) with `imask_jax.metrics`.
Everything is a function of the checkpoint, the config and the data: run it again and the
same files come out.

Outputs, written into DIR/eval/<step>/ as a whole or not at all (a split other than the
config's eval.split goes to DIR/eval/<step>_<split>/); docs/evaluation.md describes every
column:
  metrics.csv    a row per volume and tissue (METRICS_COLUMNS)
  ap.csv         COCO mask AP per class, over all slices ('all') and per volume (AP_COLUMNS)
  thickness.csv  knee: per volume and plate, truth / prediction mean thickness and the
                 prediction - truth difference map's mean and SD (THICKNESS_COLUMNS)
  volumes.csv    effusion: per volume and rater (readers and model), right / left / total mL
  summary.md     mean +- SD tables laid out like the paper's Tables 3-7
  eval.json      what was evaluated (workdir, step, split, cases, conventions)
  labels/        the predicted label maps, <case>.nii.gz, on the input's grid
  figures/       overlays, thickness and difference maps, Bland-Altman plots (PNG)

Mask AP is computed at SOURCE slice resolution: detections are pasted into the original slice
(`whole_volume.detections_to_source`) and compared with the truth instances of that slice
(`instances.extract_instances` with the config's instance mode, every truth pixel kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from data_pipelines import instances as instances_lib
from data_pipelines import orientation, readers, tissues
from data_pipelines.atomic import atomic_dir
from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.nifti_io import save_nifti
from data_pipelines.tissues import LabelScheme
from imask_jax import configs, errors, evaluate_knee, metrics, viz
from imask_jax.evaluation import report

if TYPE_CHECKING:  # imported where used: `--help` answers without JAX and TensorFlow
  from imask_jax.inference import loading
  from imask_jax.inference.whole_volume import VolumePrediction

REFERENCE_RATER = 'reference'  # the default reader (labelsTr/) of a multi-reader dataset


# --- one volume ----------------------------------------------------------------------------------


def truth_instances(
  label_slice: np.ndarray, scheme: LabelScheme, instance_mode: str
) -> list[tuple[int, np.ndarray]]:
  """(class id, mask) of every truth instance of a label slice (label values), in the
  config's instance mode; no minimum size (every truth pixel counts)."""
  found = instances_lib.extract_instances(
    label_slice, scheme.class_map, mode=instance_mode, min_pixels=1
  )
  return [(int(c), m) for c, m in zip(found.classes, found.masks)]


def evaluate_case(
  case_id: str,
  truth: np.ndarray,
  prediction: VolumePrediction,
  scheme: LabelScheme,
  spacing: Sequence[float],
  reader_maps: Mapping[str, np.ndarray] | None = None,
  *,
  thickness_method: str,
  side: tuple[str, str] | None = None,
  label_split: tuple[np.ndarray, int, int] | None = None,
) -> report.CaseResult:
  """Measures one volume. truth / prediction.canonical: canonical label maps (label values)
  with `spacing` (mm, canonical axis order); reader_maps: each reader's canonical label map,
  for effusion volumes; thickness_method: the config's eval.thickness_method; side: the
  knee's side ('left' / 'right') and its basis, which names the medial and lateral subregions
  (None: no subregions); label_split: the stored labels with their medial and lateral tibial
  cartilage values, to compare with the geometric split."""
  pred = prediction.canonical
  values = scheme.label_values
  overlap = metrics.overlap_per_label(pred, truth, values)
  surface = metrics.surface_metrics_per_label(pred, truth, spacing, values, voxel_hausdorff=True)
  # Per-slice 2D metrics in the plane the model segments (the paper's method is 2D).
  slices = metrics.slice_metrics_per_label(
    pred, truth, orientation.plane_axes(prediction.plane).slice_axis, spacing, values
  )
  thickness, note = None, ''
  knee = scheme.knee
  if knee is not None:

    def compare(pred_map: np.ndarray, truth_map: np.ndarray) -> dict[str, Any]:
      return metrics.compare_thickness(
        pred_map,
        truth_map,
        spacing,
        labels=knee,
        angle_bin_deg=metrics.femoral_angle_bin_deg(spacing),
        method=thickness_method,
      )

    try:  # the whole plates (a tissue trained as parts joined)
      thickness = compare(scheme.with_parts_joined(pred), scheme.with_parts_joined(truth))
    except ValueError as error:  # the truth lacks a plate, or too little of it to fit
      note = str(error)
    for part, (tissue, _) in scheme.parts.items() if thickness is not None else ():
      try:  # each part as a plate of its own, beside the whole (medial / lateral tibial)
        whole = compare(scheme.part_alone(pred, part), scheme.part_alone(truth, part))
        thickness[part] = whole[tissues.plate_of(tissue)]
      except ValueError as error:
        note = (note + '; ' if note else '') + f'{part}: {error}'

  regions, region_note, agreement = {}, '', None
  if thickness is not None and side is not None:
    regions, region_note = evaluate_knee.truth_and_prediction_subregions(thickness, side[0])
    if label_split is not None and 'tibial' in thickness and 'truth' in regions:
      agreement = evaluate_knee.split_agreement(
        thickness['tibial'].truth, side[0], label_split, spacing
      )
  elif knee is not None:
    region_note = 'no subregions: ' + (note or "the knee's side is not known")
  rater_ml = {}
  if scheme.effusion_value is not None:
    for rater, labels in (reader_maps or {}).items():
      rater_ml[rater] = metrics.effusion_ml_by_side(labels, spacing, scheme.effusion_value)
    rater_ml[report.MODEL_RATER] = metrics.effusion_ml_by_side(pred, spacing, scheme.effusion_value)
  return report.CaseResult(
    case_id=case_id,
    overlap=overlap,
    surface=surface,
    truth_ml=metrics.volumes_ml_per_label(truth, spacing, values),
    pred_ml=metrics.volumes_ml_per_label(pred, spacing, values),
    thickness=thickness,
    thickness_note=note,
    rater_ml=rater_ml,
    slices=slices,
    side='' if side is None else side[0],
    side_basis='' if side is None else side[1],
    subregions=regions,
    subregion_note=region_note,
    split_agreement=agreement,
  )


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
  thickness_method = configs.thickness_method(config)
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
        else evaluate_knee.case_side(case, volume, scheme, stored, source),
        label_split=None
        if scheme.knee is None
        else evaluate_knee.tibial_label_split(stored, source),
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
    'model_kind': configs.model_kind(config),
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.evaluate',
    description='Evaluate a checkpoint on whole held-out volumes: metrics.csv, summary.md '
    'and figures in WORKDIR/eval/<step>/.',
  )
  parser.add_argument('--workdir', required=True, help='training workdir (has config.json)')
  parser.add_argument(
    '--checkpoint', type=int, default=None, help='checkpoint step (default: the latest)'
  )
  parser.add_argument(
    '--split',
    default=None,
    choices=params_lib.SPLITS,
    help="split to evaluate (default: the config's eval.split, 'test')",
  )
  parser.add_argument(
    '--verbose',
    action='store_true',
    help='show the traceback of a user mistake, not only its message',
  )
  args = parser.parse_args(argv)
  try:
    report = evaluate_workdir(
      args.workdir,
      args.checkpoint,
      args.split,
      progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
  except errors.USER_ERRORS as error:
    if args.verbose:
      raise
    # One line (no workdir, no such checkpoint, one that cannot be restored, bad data).
    print(f'{parser.prog}: {type(error).__name__}: {error}', file=sys.stderr)
    return errors.EXIT_REFUSED
  print(report.summary)
  print(f'written to {report.out_dir}')
  return errors.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
