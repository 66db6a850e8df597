"""The knee endpoints of an evaluation: which side the knee is (what its image declares, its
labels' medial / lateral split, or the anatomy), the femorotibial subregions of truth and
prediction, and how the labels' split agrees with the geometric one. `case_metrics` calls these
per volume; the definitions live in metrics/ (side.py, subregions.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines import readers, tissues
from data_pipelines.datasets import sources
from data_pipelines.errors import DataError
from data_pipelines.tissues import LabelScheme
from imask_jax import metrics


def split_agreement(
  tibial: metrics.ThicknessMap,
  side: str,
  label_split: tuple[np.ndarray, int, int],
  spacing: Sequence[float],
) -> float | None:
  """The share of the labels' medial and lateral tibial cartilage voxels that the geometric
  split (metrics.subregions: MT / LT on the truth's tibial map) puts on the same side; voxels
  whose map cell lies in neither plate are left out. None without such voxels."""
  from imask_jax.metrics import subregions

  labels, medial, lateral = label_split
  plates = subregions.tibial_regions(tibial, side)
  agree = total = 0
  for value, plate in ((medial, 'MT'), (lateral, 'LT')):
    i, j, _ = np.nonzero(labels == value)
    rows = np.searchsorted(tibial.row_edges, j * float(spacing[1]), side='right') - 1
    cols = np.searchsorted(tibial.col_edges, i * float(spacing[0]), side='right') - 1
    inside = (
      (rows >= 0) & (rows < plates['MT'].shape[0]) & (cols >= 0) & (cols < plates['MT'].shape[1])
    )
    rows, cols = rows[inside], cols[inside]
    either = plates['MT'][rows, cols] | plates['LT'][rows, cols]
    agree += int(np.sum(plates[plate][rows, cols]))
    total += int(np.sum(either))
  return agree / total if total else None


def tibial_label_split(
  stored: readers.Volume, source: sources.VolumeSource
) -> tuple[np.ndarray, int, int] | None:
  """(the stored canonical label map, its medial and its lateral tibial cartilage value) when
  the dataset labels them apart (dataset.json names medial_tibial_cartilage and
  lateral_tibial_cartilage: OAIZIB-CM), else None."""
  names = dict(source.label_values)
  medial, lateral = (
    names.get(n) for n in (tissues.MEDIAL_TIBIAL_CARTILAGE, tissues.LATERAL_TIBIAL_CARTILAGE)
  )
  if medial is None or lateral is None or stored.labels is None:
    return None
  return stored.labels, int(medial), int(lateral)


def side_from_label_split(
  split: tuple[np.ndarray, int, int], spacing: Sequence[float]
) -> tuple[str, str] | None:
  """The side the labels' medial and lateral tibial cartilage give: in RAS+ a right knee's
  medial plate is at smaller R than its lateral one."""
  labels, medial, lateral = split
  r = {}
  for name, value in (('medial', medial), ('lateral', lateral)):
    along_r = np.nonzero(labels == value)[0]
    if not along_r.size:
      return None
    r[name] = float(along_r.mean()) * float(spacing[0])
  side = 'right' if r['medial'] < r['lateral'] else 'left'
  return side, (
    f'the labels: medial tibial cartilage ({medial}) at R {r["medial"]:.1f} mm, lateral '
    f'({lateral}) at {r["lateral"]:.1f} mm (array mm)'
  )


def case_side(
  case: readers.Case,
  volume: readers.Volume,
  scheme: LabelScheme,
  stored: readers.Volume | None = None,
  source: sources.VolumeSource | None = None,
) -> tuple[str, str] | None:
  """(side, basis) of a knee being evaluated: what its image declares (a DICOM series' tags,
  a sidecar beside a NIfTI file; data_pipelines/laterality.py), else what its labels say where
  they split medial and lateral tibial cartilage (`stored`, `source`), else the estimate from
  its truth label map (metrics/side.py); None when none tells."""
  from data_pipelines import laterality

  try:
    declared = laterality.declared_side(case.image)
  except (laterality.SideConflict, DataError) as error:
    declared, why = None, f'its declarations are unusable ({error})'
  else:
    why = 'nothing declared'
  if declared is not None:
    return declared.side, f'declared: {declared.basis}'
  split = None if stored is None or source is None else tibial_label_split(stored, source)
  labelled = None if split is None else side_from_label_split(split, volume.spacing)
  if labelled is not None:
    return labelled[0], f'from {labelled[1]}'
  truth = scheme.with_parts_joined(volume.labels)
  estimate = metrics.estimate_side(truth, volume.spacing, scheme.knee)
  if estimate.side is None:
    return None
  return estimate.side, f'estimated from the truth label map ({why}): {estimate.basis}'


def truth_and_prediction_subregions(
  thickness: Mapping[str, metrics.PlateComparison], side: str
) -> tuple[dict[str, dict[str, Any]], str]:
  """({'truth': regions, 'prediction': regions}, a note on what could not be measured): each
  segmentation's subregions found on its own maps of `compare_thickness`."""
  out, notes = {}, []
  for source, attribute in (('truth', 'truth'), ('prediction', 'pred')):
    femoral, tibial = (
      getattr(thickness[plate], attribute) if plate in thickness else None
      for plate in ('femoral', 'tibial')
    )
    try:
      out[source] = metrics.knee_subregions(femoral, tibial, side)
    except ValueError as error:  # too little cartilage to find the plates or the notch
      notes.append(f'{source}: {error}')
  return out, '; '.join(notes)
