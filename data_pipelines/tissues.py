"""The tissue vocabulary, defined once: tissue names, their label values and the cartilage plates.

Label maps follow OAI-ZIB: 0 background, 1 femur, 2 femoral cartilage, 3 tibia, 4 tibial
cartilage. The knee phantoms add 5 = joint effusion; hip effusion datasets (the paper's STIHO,
the hip phantoms) write effusion as 1. A config names its classes with these tissue names
(`data.class_names`) and gives each one its label value (`data.class_label_values`), so a
dataset with other values maps onto the same vocabulary.

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

# Cartilage plate -> (the bone it covers, the cartilage tissue).
PLATES: dict[str, tuple[str, str]] = {
  'femoral': (FEMUR, FEMORAL_CARTILAGE),
  'tibial': (TIBIA, TIBIAL_CARTILAGE),
}
_KNEE_VALUE = {name: value for value, name in KNEE_LABELS.items()}


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
  `class_names[c - 1]` and is written as label value `label_values[c - 1]`."""

  class_names: tuple[str, ...]
  label_values: tuple[int, ...]

  def __post_init__(self):
    if len(self.class_names) != len(self.label_values) or not self.class_names:
      raise ValueError(
        f'config data.class_names {self.class_names} and '
        f'data.class_label_values {self.label_values}: expected one label value '
        'per class name'
      )
    if any(not 1 <= v <= 255 for v in self.label_values):
      raise ValueError(
        f'config data.class_label_values {self.label_values}: expected values in 1..255'
      )

  @classmethod
  def from_config(cls, config: Any) -> LabelScheme:
    """The scheme of an experiment config (`data.class_names`, `data.class_label_values`)."""
    scheme = cls(
      tuple(str(n) for n in config.data.class_names),
      tuple(int(v) for v in config.data.class_label_values),
    )
    if len(scheme.class_names) != int(config.model.num_classes):
      raise ValueError(
        f'config model.num_classes={config.model.num_classes} but '
        f'data.class_names has {len(scheme.class_names)} classes'
      )
    return scheme

  @property
  def names_by_value(self) -> dict[int, str]:
    return dict(zip(self.label_values, self.class_names))

  @property
  def class_map(self) -> dict[int, int]:
    """Label value -> class id."""
    return {v: i + 1 for i, v in enumerate(self.label_values)}

  @property
  def knee(self) -> KneeLabelValues | None:
    """The four knee tissues' label values when every one of them is a class, else None."""
    if not all(n in self.class_names for n in KNEE_CLASSES):
      return None
    value = dict(zip(self.class_names, self.label_values))
    return KneeLabelValues(*(value[n] for n in KNEE_CLASSES))

  @property
  def effusion_value(self) -> int | None:
    """The label value of class 'effusion', or None for a dataset without it."""
    value = dict(zip(self.class_names, self.label_values))
    return value.get(EFFUSION)

  def to_label_values(self, class_ids: np.ndarray) -> np.ndarray:
    """int class ids (0 = background, 1..K) of any shape -> uint8 label values."""
    class_ids = np.asarray(class_ids)
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() > len(self.label_values)):
      raise ValueError(
        f'class ids in [{class_ids.min()}, {class_ids.max()}]; expected 0..'
        f'{len(self.label_values)} for classes {self.class_names}'
      )
    lookup = np.array((0,) + self.label_values, np.uint8)
    return lookup[class_ids]
