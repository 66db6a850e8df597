"""Rules applied to a predicted volume after its slices are painted.

The network sees one slice at a time, so nothing stops it from painting a bone-like blob
into a slice far from the joint (the outermost slices of a wide field of view, where it never
saw air in training). A tissue that is one object in every knee (a femur, a tibia) is kept
as its largest 3D connected component, as nnU-Net's post-processing does for classes where
its validation shows that this helps. Tissues that may come in several pieces (the medial
and lateral tibial plates, effusion in both hips) are left alone by that rule. Measured:
docs/evaluation.md.

Effusion comes in pockets (recesses of one joint capsule), so its rule keeps a cluster:
components within a radius of each other, the cluster of largest volume, and in a bilateral
scan one such cluster on each side of the mid-sagittal plane (one joint per side). Bright fluid
elsewhere (bladder, bowel, vessels) is then dropped however confident the network was.
Measured: docs/results/hip.md.

Cartilage lies on its bone, so a cartilage component with no voxel near the bone it covers
(a speck painted far from the joint) is dropped (`keep_attached`). Measured:
docs/results/baselines.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from data_pipelines.tissues import PLATES, SUBCLASS_OF, LabelScheme

# 26-connected in 3D: voxels touching at a corner are one object, so a thin bridge between
# two parts of one bone never splits it.
_FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)
# keep_largest_component: runs of up to this many slices without the tissue do not split it.
BRIDGED_SLICES = 2


def class_ids(scheme: LabelScheme, names: Sequence[str], field: str) -> tuple[int, ...]:
  """Class ids (1..K) of tissue `names` in `scheme`; `field` names the config setting for the
  error when a name is not one of the scheme's classes."""
  unknown = [n for n in names if n not in scheme.class_names]
  if unknown:
    raise ValueError(
      f'config {field}={tuple(names)}: {unknown} not among the classes {scheme.class_names}'
    )
  return tuple(scheme.class_names.index(n) + 1 for n in names)


def check_rules(scheme: LabelScheme, model_config: Any) -> None:
  """Every post-processing setting of a config's model section; ValueError naming the field
  of the first that cannot work."""
  class_ids(scheme, model_config.keep_largest_component, 'model.keep_largest_component')
  cluster_rule(scheme, model_config)
  attach_rule(scheme, model_config)


def keep_largest_component(
  class_volume: np.ndarray, ids: Sequence[int], bridged_slices: int = BRIDGED_SLICES
) -> np.ndarray:
  """Sets to background (0) every voxel of each class in `ids` outside that class's largest
  26-connected component, where a run of up to `bridged_slices` slices without the class
  does not split it.

  A slice-by-slice model sometimes misses a bone on one slice; without the bridge that one
  slice cuts the bone in two and the rule throws away the smaller half (seen on a knee
  phantom: a femur missed on one sagittal slice lost the 23 slices of its lateral condyle).
  Two pieces count as one when they lie within `bridged_slices` empty slices of each other
  and touch in the slice plane (within one pixel); blobs elsewhere in the plane stay apart.

  class_volume: int [n, h, w] class ids, a stack of slices along axis 0 (the bridge runs along
    that axis; the component with most voxels is the one with the largest volume since all
    voxels of a grid have one size).
  bridged_slices: longest run of empty slices bridged (0: plain 26-connectivity). Each voxel
    is extended by that many slices towards higher slice indices before labelling, so two
    voxels are linked when their slices differ by at most bridged_slices + 1 and their
    in-plane positions by at most one pixel each way.
  Returns a new array; ties between equal components keep the first in scan order.
  """
  class_volume = np.asarray(class_volume)
  if class_volume.ndim != 3:
    raise ValueError(f'class volume of shape {class_volume.shape}; expected 3 axes')
  if bridged_slices < 0:
    raise ValueError(f'bridged_slices={bridged_slices}; expected >= 0')
  out = class_volume.copy()
  for class_id in ids:
    mask = class_volume == class_id
    grown = mask.copy()
    for shift in range(1, int(bridged_slices) + 1):
      grown[shift:] |= mask[:-shift]
    components, count = ndi.label(grown, structure=_FULL_CONNECTIVITY)
    if count <= 1:
      continue
    sizes = np.bincount(components[mask], minlength=count + 1)  # the class's own voxels
    sizes[0] = 0
    out[mask & (components != int(np.argmax(sizes)))] = 0
  return out


@dataclasses.dataclass(frozen=True)
class ClusterRule:
  """config model.keep_largest_cluster (as class ids), cluster_radius_mm, cluster_per_side,
  cluster_min_ml: see `keep_largest_cluster`."""

  ids: tuple[int, ...]
  radius_mm: float
  per_side: bool
  min_ml: float


def cluster_rule(scheme: LabelScheme, model_config: Any) -> ClusterRule:
  """The cluster rule of a config's model section; ValueError naming the field when it
  cannot work."""
  ids = class_ids(scheme, model_config.keep_largest_cluster, 'model.keep_largest_cluster')
  rule = ClusterRule(
    ids,
    float(model_config.cluster_radius_mm),
    bool(model_config.cluster_per_side),
    float(model_config.cluster_min_ml),
  )
  for name, value in (('cluster_radius_mm', rule.radius_mm), ('cluster_min_ml', rule.min_ml)):
    if not value >= 0:  # also refuses NaN
      raise ValueError(f'config model.{name}={value}; expected >= 0')
  return rule


def keep_largest_cluster(
  volume: np.ndarray,
  ids: Sequence[int],
  spacing: Sequence[float],
  radius_mm: float,
  per_side: bool = False,
  min_ml: float = 0.0,
) -> np.ndarray:
  """Sets to background each class of `ids` outside its largest cluster.

  The 26-connected components of a class form clusters by single linkage: two components
  whose nearest voxel centres lie within `radius_mm` of each other are in one cluster. The
  cluster with the largest total volume is kept (ties: the one holding the first component in
  scan order); a cluster under `min_ml` (mL) is not kept either (a dry joint's speck of false
  positive).

  volume: int canonical RAS+ [X, Y, Z] class ids (X toward the patient's right);
  spacing: mm along X, Y, Z. per_side: the rule runs on each side of the plane through the
  centre of X on its own (a bilateral scan: one cluster per joint; the central column of an
  odd X goes with the left side). Returns a new array.
  """
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f'class volume of shape {volume.shape}; expected 3 axes')
  out = volume.copy()
  voxel_ml = float(np.prod(np.asarray(spacing, float))) / 1000.0
  right = np.arange(volume.shape[0]) > (volume.shape[0] - 1) / 2
  sides = (right, ~right) if per_side else (np.ones(volume.shape[0], bool),)
  for class_id in ids:
    for side in sides:
      mask = (volume == class_id) & side[:, None, None]
      if not mask.any():
        continue
      # Every component lies in the mask's bounding box, so distances between components are
      # exact within it: the transforms need no more than that box.
      box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(mask))
      components, count = ndi.label(mask[box], structure=_FULL_CONNECTIVITY)
      cluster = _single_linkage(components, count, spacing, radius_mm)
      sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
      totals = np.bincount(cluster, weights=sizes)
      best = int(np.argmax(totals))
      kept = np.flatnonzero(cluster == best) + 1
      if totals[best] * voxel_ml < min_ml:
        kept = kept[:0]
      drop = np.zeros(volume.shape, bool)
      drop[box] = (components > 0) & ~np.isin(components, kept)
      out[drop] = 0
  return out


def _single_linkage(
  components: np.ndarray, count: int, spacing: Sequence[float], radius_mm: float
) -> np.ndarray:
  """Cluster index [count] of components 1..count: linked when their nearest voxel centres
  lie within radius_mm (transitively). Clusters are numbered by their first component."""
  parent = np.arange(count)

  def root(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  sampling = tuple(float(v) for v in spacing)
  # A link needs a voxel of the other component within radius_mm, so each distance transform
  # runs on the component's box grown by the radius only: exact for every link, and the work
  # no longer grows with components x whole box (thousands of specks in a noisy prediction).
  reach = [int(np.floor(radius_mm / mm)) + 1 for mm in sampling]
  boxes = ndi.find_objects(components)
  for i in range(1, count):  # the last component's links are all found from the others
    window = tuple(
      slice(max(box.start - r, 0), min(box.stop + r, n))
      for box, r, n in zip(boxes[i - 1], reach, components.shape)
    )
    local = components[window]
    others = np.unique(local[local > i])
    if others.size == 0:
      continue
    distance = ndi.distance_transform_edt(local != i, sampling=sampling)
    nearest = np.asarray(ndi.minimum(distance, local, index=others))
    for j in others[nearest <= radius_mm]:
      a, b = root(i - 1), root(int(j) - 1)
      parent[max(a, b)] = min(a, b)
  return np.array([root(i) for i in range(count)])


@dataclasses.dataclass(frozen=True)
class AttachRule:
  """config model.keep_attached (as (cartilage class id, bone class id) pairs) and
  attach_radius_mm: see `keep_attached`."""

  pairs: tuple[tuple[int, int], ...]
  radius_mm: float


def attach_rule(scheme: LabelScheme, model_config: Any) -> AttachRule:
  """The attachment rule of a config's model section: each cartilage name paired with the
  bone it covers (`tissues.PLATES`; a part such as medial tibial cartilage with its tissue's
  bone). ValueError naming the field when a name is no cartilage or its bone is no class."""
  names = tuple(model_config.keep_attached)
  ids = class_ids(scheme, names, 'model.keep_attached')
  bone_of = {cartilage: bone for bone, cartilage in PLATES.values()}
  pairs = []
  for name, cartilage_id in zip(names, ids):
    bone = bone_of.get(SUBCLASS_OF.get(name, name))
    if bone is None:
      raise ValueError(
        f'config model.keep_attached={names}: {name!r} is not a cartilage '
        f'(one of {tuple(bone_of)} or their parts)'
      )
    if bone not in scheme.class_names:
      raise ValueError(
        f'config model.keep_attached={names}: {name!r} lies on the {bone}, which is not '
        f'among the classes {scheme.class_names}'
      )
    pairs.append((cartilage_id, scheme.class_names.index(bone) + 1))
  radius = float(model_config.attach_radius_mm)
  if not radius >= 0:  # also refuses NaN
    raise ValueError(f'config model.attach_radius_mm={radius}; expected >= 0')
  return AttachRule(tuple(pairs), radius)


def keep_attached(
  volume: np.ndarray,
  pairs: Sequence[tuple[int, int]],
  spacing: Sequence[float],
  radius_mm: float,
) -> np.ndarray:
  """Sets to background each 26-connected component of a cartilage class whose nearest voxel
  centre lies farther than `radius_mm` from every voxel of its bone class.

  volume: int [X, Y, Z] class ids on a grid of `spacing` mm per axis. pairs: (cartilage class
  id, bone class id). Where the bone class is absent the cartilage is left as it is (nothing to
  judge it by). A component touching its bone lies one voxel from it, so radius_mm should
  exceed the coarsest spacing; the default (configs) also bridges a slice or two of a missed
  bone. Returns a new array.
  """
  volume = np.asarray(volume)
  if volume.ndim != 3:
    raise ValueError(f'class volume of shape {volume.shape}; expected 3 axes')
  out = volume.copy()
  sampling = tuple(float(v) for v in spacing)
  for cartilage_id, bone_id in pairs:
    bone = volume == bone_id
    if not bone.any():
      continue
    components, count = ndi.label(volume == cartilage_id, structure=_FULL_CONNECTIVITY)
    if count == 0:
      continue
    to_bone = ndi.distance_transform_edt(~bone, sampling=sampling)
    nearest = np.asarray(ndi.minimum(to_bone, components, index=np.arange(1, count + 1)))
    far = np.flatnonzero(nearest > radius_mm) + 1
    out[np.isin(components, far)] = 0
  return out
