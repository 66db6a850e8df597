"""The tissue vocabulary, defined once: tissue names, their label values and the cartilage plates.

Label maps follow OAI-ZIB: 0 background, 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial
cartilage. The knee phantoms add 5 = joint effusion; hip effusion datasets (the paper's STIHO,
the hip phantoms) write effusion as 1. A config names its classes with these tissue names
(`data.class_names`) and gives each one its label value (`data.class_label_values`), so a
dataset with other values maps onto the same vocabulary. A class may also take several label
values, merged into it: OAIZIB-CM labels tibial cartilage medial 4 / lateral 5, and
`class_label_values = (1, 2, 3, (4, 5))` trains the four tissues of OAI-ZIB from it. The first
value of a class is its canonical value: what predictions write and what truth maps are mapped
to before they are compared.

Sub-classes: a class may be a part of a vocabulary tissue (`SUBCLASS_OF`, e.g. medial and
lateral tibial cartilage), so a model trained on the parts still has the whole plate for
thickness, and the parts are reported beside it.

This module is the bottom of the house: data_pipelines, metrics, models' configs, evaluation and
prediction all import it, and it imports nothing of theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FEMUR = 'femur'
FEMORAL_CARTILAGE = 'femoral_cartilage'
TIBIA = 'tibia'
TIBIAL_CARTILAGE = 'tibial_cartilage'
EFFUSION = 'effusion'
BACKGROUND = 'background'
MEDIAL_TIBIAL_CARTILAGE = 'medial_tibial_cartilage'
LATERAL_TIBIAL_CARTILAGE = 'lateral_tibial_cartilage'

# The four tissues of knee MRI segmentation, in class order (class id = position + 1).
KNEE_CLASSES = (FEMUR, FEMORAL_CARTILAGE, TIBIA, TIBIAL_CARTILAGE)
# The hip effusion task has one class.
HIP_CLASSES = (EFFUSION,)

# Label value -> tissue name of OAI-ZIB label maps (the default knee labelling).
KNEE_LABELS: dict[int, str] = {1: FEMUR, 2: FEMORAL_CARTILAGE, 3: TIBIA, 4: TIBIAL_CARTILAGE}
# name -> value, background included, as nnU-Net's dataset.json `labels` writes it.
OAI_ZIB_LABELS: dict[str, int] = {BACKGROUND: 0, **{n: v for v, n in KNEE_LABELS.items()}}
KNEE_PHANTOM_LABELS: dict[str, int] = {**OAI_ZIB_LABELS, EFFUSION: 5}
HIP_LABELS: dict[str, int] = {BACKGROUND: 0, EFFUSION: 1}
# OAIZIB-CM (the NIfTI release of OAI-ZIB with CartiMorph's labels) splits tibial cartilage.
OAIZIB_CM_LABELS: dict[str, int] = {
  BACKGROUND: 0,
  FEMUR: 1,
  FEMORAL_CARTILAGE: 2,
  TIBIA: 3,
  MEDIAL_TIBIAL_CARTILAGE: 4,
  LATERAL_TIBIAL_CARTILAGE: 5,
}
# The OAI-ZIB archive's classification/ masks label the bones only: 1 femur, 2 tibia. Their
# values are a subset of the segmentation masks' and pass every value check, so a run that
# finds only these values is told so by name (data_pipelines/datasets/builders.py).
ZIB_CLASSIFICATION_LABELS: dict[str, int] = {BACKGROUND: 0, FEMUR: 1, TIBIA: 2}
# Label schemes of public releases, by name: a training set whose values match one of these
# but not the config's is reported with the scheme's name.
KNOWN_SCHEMES: dict[str, dict[str, int]] = {
  'OAI-ZIB segmentation masks': OAI_ZIB_LABELS,
  'OAIZIB-CM': OAIZIB_CM_LABELS,
  'ZIB classification masks': ZIB_CLASSIFICATION_LABELS,
}

# A part of a vocabulary tissue -> the tissue (and the part's name in reports).
SUBCLASS_OF: dict[str, str] = {
  MEDIAL_TIBIAL_CARTILAGE: TIBIAL_CARTILAGE,
  LATERAL_TIBIAL_CARTILAGE: TIBIAL_CARTILAGE,
}

# Cartilage plate -> (the bone it covers, the cartilage tissue).
PLATES: dict[str, tuple[str, str]] = {
  'femoral': (FEMUR, FEMORAL_CARTILAGE),
  'tibial': (TIBIA, TIBIAL_CARTILAGE),
}


def plate_of(cartilage: str) -> str:
  """The plate ('femoral', 'tibial') whose cartilage is the tissue `cartilage`."""
  return next(plate for plate, (_, tissue) in PLATES.items() if tissue == cartilage)


_KNEE_VALUE = {name: value for value, name in KNEE_LABELS.items()}


def class_values(entry: Any) -> tuple[int, ...]:
  """One entry of `data.class_label_values` (a label value, or a sequence of the label values
  merged into one class) as a tuple of ints, the canonical value first."""
  if isinstance(entry, (list, tuple)):
    values = tuple(entry)
  else:
    values = (entry,)
  if not values or any(isinstance(v, bool) or int(v) != v for v in values):
    raise ValueError(
      f'config data.class_label_values entry {entry!r}: expected a label value or a tuple '
      'of label values'
    )
  return tuple(int(v) for v in values)


def normalized_class_values(entries: Any) -> tuple[int | tuple[int, ...], ...]:
  """`data.class_label_values` in a stable form: an int for a class with one value, a tuple
  for a class with several (so the settings of single-value configs read as they always did)."""
  out = []
  for entry in entries:
    values = class_values(entry)
    out.append(values[0] if len(values) == 1 else values)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class KneeLabelValues:
  """Label values of the four knee tissues in the label map (OAI-ZIB's by default)."""

  femur: int = _KNEE_VALUE[FEMUR]
  femoral_cartilage: int = _KNEE_VALUE[FEMORAL_CARTILAGE]
  tibia: int = _KNEE_VALUE[TIBIA]
  tibial_cartilage: int = _KNEE_VALUE[TIBIAL_CARTILAGE]


@dataclasses.dataclass(frozen=True)
class LabelScheme:
  """The classes of a config and their label values: class id c (1..K) is
  `class_names[c - 1]`, written as label value `label_values[c - 1]` (its canonical value).

  merged_values: every label value of each class, canonical first (several when a dataset
  splits a class, OAIZIB-CM's tibial cartilage (4, 5)); defaults to one value per class.
  Truth label maps go through `to_canonical` before they meet a prediction.
  """

  class_names: tuple[str, ...]
  label_values: tuple[int, ...]
  merged_values: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    if not self.merged_values:
      object.__setattr__(self, 'merged_values', tuple((v,) for v in self.label_values))
    if (
      len(self.class_names) != len(self.label_values)
      or len(self.merged_values) != len(self.label_values)
      or not self.class_names
    ):
      raise ValueError(
        f'config data.class_names {self.class_names} and '
        f'data.class_label_values {self.label_values}: expected one label value '
        'per class name'
      )
    every = [v for values in self.merged_values for v in values]
    if any(not 1 <= v <= 255 for v in every):
      raise ValueError(
        f'config data.class_label_values {self.merged_values}: expected values in 1..255'
      )
    if len(set(every)) != len(every):
      raise ValueError(
        f'config data.class_label_values {self.merged_values}: a label value belongs to '
        'two classes; expected each value in one class'
      )
    if any(values[0] != v for values, v in zip(self.merged_values, self.label_values)):
      raise ValueError(f'LabelScheme: label_values {self.label_values} are not the first values')

  @classmethod
  def from_values(cls, class_names: Any, entries: Any) -> LabelScheme:
    """The scheme of class names and `data.class_label_values` entries (int or tuple each)."""
    merged = tuple(class_values(e) for e in entries)
    return cls(tuple(str(n) for n in class_names), tuple(v[0] for v in merged), merged)

  @classmethod
  def from_config(cls, config: Any) -> LabelScheme:
    """The scheme of an experiment config (`data.class_names`, `data.class_label_values`).
    The model predicts one class per name; an experiment file that still sets
    `model.num_classes` must agree with the names."""
    scheme = cls.from_values(config.data.class_names, config.data.class_label_values)
    declared = config.model.get('num_classes') if 'model' in config else None
    if declared is not None and int(declared) != len(scheme.class_names):
      raise ValueError(
        f'config model.num_classes={declared} but data.class_names has '
        f'{len(scheme.class_names)} classes; the number of classes follows from '
        'data.class_names, leave model.num_classes out'
      )
    return scheme

  @property
  def names_by_value(self) -> dict[int, str]:
    """Canonical label value -> class name."""
    return dict(zip(self.label_values, self.class_names))

  @property
  def names_by_merged_value(self) -> dict[int, str]:
    """Every label value a class is read from (merged ones included) -> class name."""
    return {v: n for n, values in zip(self.class_names, self.merged_values) for v in values}

  @property
  def class_map(self) -> dict[int, int]:
    """Label value (every merged one) -> class id."""
    return {v: i + 1 for i, values in enumerate(self.merged_values) for v in values}

  @property
  def canonical_map(self) -> dict[int, int]:
    """Merged label value -> its class's canonical value, for the values that differ."""
    return {v: values[0] for values in self.merged_values for v in values[1:]}

  def to_canonical(self, labels: np.ndarray) -> np.ndarray:
    """A label map (any shape) with every merged value replaced by its canonical value."""
    return canonical_labels(labels, self.canonical_map)

  @property
  def parts(self) -> dict[str, tuple[str, int]]:
    """Sub-class name -> (the vocabulary tissue it is a part of, its canonical value), for the
    classes that are parts of a tissue that is not itself a class (`SUBCLASS_OF`)."""
    value = dict(zip(self.class_names, self.label_values))
    return {
      name: (SUBCLASS_OF[name], value[name])
      for name in self.class_names
      if name in SUBCLASS_OF and SUBCLASS_OF[name] not in value
    }

  def tissue_values(self) -> dict[str, tuple[int, ...]]:
    """Vocabulary tissue -> the canonical values that make it up: a class's own value, or the
    values of its parts when only they are classes."""
    out = {name: (v,) for name, v in zip(self.class_names, self.label_values)}
    for tissue, v in self.parts.values():
      out.setdefault(tissue, ())
      out[tissue] += (v,)
    return out

  def with_parts_joined(self, labels: np.ndarray) -> np.ndarray:
    """A canonical label map with every part written as its tissue's first part value (so the
    whole plate is one label, as `knee` names it); unchanged without parts."""
    joined = {}
    for values in self.tissue_values().values():
      joined.update({v: values[0] for v in values[1:]})
    return canonical_labels(labels, joined)

  def part_alone(self, labels: np.ndarray, part: str) -> np.ndarray:
    """`with_parts_joined(labels)` with only `part` left of its tissue: the plate of one part
    (medial tibial cartilage alone), for thickness measured per part."""
    tissue, value = self.parts[part]
    values = self.tissue_values()[tissue]
    others = {v: 0 for v in values if v != value}
    return canonical_labels(labels, {**others, value: values[0]})

  @property
  def knee(self) -> KneeLabelValues | None:
    """The four knee tissues' label values when every one of them is a class (or made of
    classes that are its parts: see `with_parts_joined`), else None."""
    values = self.tissue_values()
    if not all(n in values for n in KNEE_CLASSES):
      return None
    return KneeLabelValues(*(values[n][0] for n in KNEE_CLASSES))

  @property
  def effusion_value(self) -> int | None:
    """The label value of class 'effusion', or None for a dataset without it."""
    value = dict(zip(self.class_names, self.label_values))
    return value.get(EFFUSION)

  def to_label_values(self, class_ids: np.ndarray) -> np.ndarray:
    """int class ids (0 = background, 1..K) of any shape -> uint8 (canonical) label values."""
    class_ids = np.asarray(class_ids)
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() > len(self.label_values)):
      raise ValueError(
        f'class ids in [{class_ids.min()}, {class_ids.max()}]; expected 0..'
        f'{len(self.label_values)} for classes {self.class_names}'
      )
    lookup = np.array((0,) + self.label_values, np.uint8)
    return lookup[class_ids]


def canonical_labels(labels: np.ndarray, value_map: dict[int, int]) -> np.ndarray:
  """`labels` (uint8, any shape) with each key of `value_map` replaced by its value; the same
  array when there is nothing to replace."""
  if not value_map:
    return labels
  lookup = np.arange(256, dtype=np.uint8)
  for source, target in value_map.items():
    lookup[int(source)] = int(target)
  return lookup[np.asarray(labels, np.uint8)]
