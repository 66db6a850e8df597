"""Tables of an evaluation: the CSV rows (`rows`) and summary.md in the paper's layouts
(`summary`: `segmentation` Tables 3-4, `knee` Table 5, `hip` Tables 6-7, `subregion_tables`),
their cells formatted in one place (`cells`). Everything here lays out measurements already
made (`CaseResult`, mask AP); nothing measures, nothing draws. docs/evaluation.md describes
every column. The names below are the ones evaluate, sweep and the tests use."""

from imask_jax.evaluation.report.cells import (
  finite_mean_sd,
  format_summary,
  map50_cell,
  markdown_table,
  mean_sd,
)
from imask_jax.evaluation.report.hip import agreement, effusion_overlap_table, effusion_volume_table
from imask_jax.evaluation.report.knee import thickness_coverage_table, thickness_table
from imask_jax.evaluation.report.rows import (
  AP_COLUMNS,
  AP_RESOLUTION,
  METRICS_COLUMNS,
  MODEL_RATER,
  PLATES,
  SLICE_COLUMNS,
  THICKNESS_COLUMNS,
  VOLUME_COLUMNS,
  CaseResult,
  metrics_rows,
  thickness_rows,
  write_csv,
  write_tables,
  write_text,
)
from imask_jax.evaluation.report.segmentation import (
  missing_structures,
  segmentation_tables,
  surface_table,
)
from imask_jax.evaluation.report.summary import summary_markdown

__all__ = [
  'AP_COLUMNS',
  'AP_RESOLUTION',
  'METRICS_COLUMNS',
  'MODEL_RATER',
  'PLATES',
  'SLICE_COLUMNS',
  'THICKNESS_COLUMNS',
  'VOLUME_COLUMNS',
  'CaseResult',
  'agreement',
  'effusion_overlap_table',
  'effusion_volume_table',
  'finite_mean_sd',
  'format_summary',
  'map50_cell',
  'markdown_table',
  'mean_sd',
  'metrics_rows',
  'missing_structures',
  'segmentation_tables',
  'summary_markdown',
  'surface_table',
  'thickness_coverage_table',
  'thickness_rows',
  'thickness_table',
  'write_csv',
  'write_tables',
  'write_text',
]
