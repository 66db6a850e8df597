"""summary.md of an evaluation: the header and every table that applies to the dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from imask_jax import metrics
from imask_jax.evaluation.report import subregion_tables
from imask_jax.evaluation.report.hip import effusion_overlap_table, effusion_volume_table
from imask_jax.evaluation.report.knee import thickness_table
from imask_jax.evaluation.report.rows import AP_RESOLUTION, CaseResult
from imask_jax.evaluation.report.segmentation import (
  missing_structures,
  segmentation_tables,
  surface_table,
)

if TYPE_CHECKING:
  from data_pipelines.tissues import LabelScheme


def summary_markdown(
  header: Mapping[str, Any],
  results: Sequence[CaseResult],
  scheme: LabelScheme,
  ap: Mapping[int, metrics.ClassAP],
  ap_per_case: Mapping[str, Mapping[int, metrics.ClassAP]],
  *,
  thickness_method: str,
) -> str:
  lines = [
    f'# Evaluation: {header["workdir"]} at step {header["checkpoint_step"]}, '
    f'split {header["split"]!r}',
    '',
    f'{len(results)} volume{"s" if len(results) != 1 else ""}: '
    f'{", ".join(r.case_id for r in results)}. Dataset '
    f'{header["dataset"]}, {_model_text(header)}. '
    f"Distances in mm from each volume's voxel spacing; "
    f"Hausdorff also in voxels (the paper's Table 3 unit). Mask AP at "
    f'{AP_RESOLUTION}. Empty-mask rules: docs/metrics.md (a missed structure has Dice 0 '
    f'and infinite distances; distance means are then given over the finite cases, '
    f'with the count).',
    '',
  ]
  if header.get('split_origin'):
    lines += [f'Split {header["split"]!r}: {header["split_origin"]}.', '']
  lines += segmentation_tables(results, scheme, ap, ap_per_case) + ['']
  lines += surface_table(results, scheme) + ['']
  if scheme.knee is not None:
    lines += thickness_table(results, thickness_method) + ['']
    if any(r.subregions for r in results):
      notes = [f'{r.case_id}: {r.subregion_note}' for r in results if r.subregion_note]
      shares = [r.split_agreement for r in results if r.split_agreement is not None]
      if shares:
        notes.append(
          "The labels' medial / lateral tibial cartilage against the geometric MT / LT split: "
          f'{100 * np.mean(shares):.2f} % of the voxels on the same side (mean over '
          f'{len(shares)} volumes; lowest {100 * min(shares):.2f} %).'
        )
      cases = [(r.case_id, r.subregions) for r in results]
      lines += subregion_tables.summary_table(cases, notes) + ['']
  if scheme.effusion_value is not None:
    lines += effusion_overlap_table(results, scheme, ap) + ['']
    lines += effusion_volume_table(
      results, str(header.get('subject_pattern') or ''), header.get('baseline_timepoint') or None
    ) + ['']
  lines += missing_structures(results, scheme)
  return '\n'.join(lines) + '\n'


def _model_text(header: Mapping[str, Any]) -> str:
  """The model in the summary's first lines: a semantic U-Net, or the mask head and backbone."""
  if header.get('model_kind') == 'unet':
    return 'a semantic U-Net (model.kind unet)'
  return f'mask head {header["mask_head"]}, backbone {header["backbone"]}'
