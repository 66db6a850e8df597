"""Whole volume -> label map on the original grid: the inference path of evaluate and predict.

  LoadedModel (loading.py)  +
  Volume (canonical RAS+)   --volume_inputs-->  slices prepared as evaluation prepares them
                            --detect-->  per-slice detections at network-input resolution
                            --detections_to_source-->  masks pasted at SOURCE slice resolution
                            --assemble-->  label values on the canonical grid and on the file's
                                           own grid (exactly its shape; save with grid.affine)

Back-mapping. The input pipeline resizes a [h, w] slice by `scale` = extent / (h, w) and pads
bottom/right, so a continuous network-input coordinate y_net is the source coordinate
y_src = y_net / scale_y (pixel edges at integers in both). Boxes are therefore divided by the
scale and the detections' m x m mask probabilities are pasted straight into the [h, w] source
slice (`detections.detections_to_label_map` at the source size): no resampling of a
network-resolution label map, so the output is as sharp as the mask head allows whatever the
input scale. Overlapping masks and the score cut follow `detections.detections_to_label_map`, as
at network resolution.

A U-Net (`model.kind = 'unet'`) gives class probabilities at network pixels instead of
detections: `semantic.probs_to_source` resamples them to the source slice before the argmax,
and each slice's classes (or their connected components) become its scored instances.

Class ids (1..K, the model's output) become the config's label values
(`data.class_label_values`) only at the end, in `LabelScheme.to_label_values`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import orientation, readers
from data_pipelines.tissues import LabelScheme
from imask_jax import input_pipeline, parallel
from imask_jax.inference import postprocess, semantic
from imask_jax.inference.loading import LoadedModel
from imask_jax.models import detections

# --- detections -> source resolution ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Instance:
  """One detected instance of one slice at source resolution: class id (1..K), score, and its
  pasted mask, stored as the crop `mask` bool [hh, ww] of its bounding box whose top-left pixel
  is (top, left) (an empty mask is stored as a [0, 0] crop)."""

  class_id: int
  score: float
  top: int
  left: int
  mask: np.ndarray

  def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
    """bool [h, w]: the mask on the whole slice."""
    out = np.zeros(shape, bool)
    hh, ww = self.mask.shape
    out[self.top : self.top + hh, self.left : self.left + ww] = self.mask
    return out


@functools.partial(
  jax.jit, static_argnames=('source_size', 'mask_threshold', 'min_score', 'paint_rule')
)
def _paste_at_source(
  boxes,
  scores,
  classes,
  valid,
  mask_probs,
  scale,
  source_size,
  mask_threshold,
  min_score,
  paint_rule,
):
  divisor = jnp.tile(scale.astype(jnp.float32), 2)[:, None, :]  # (sy, sx, sy, sx) per example
  det = detections.Detections(boxes / divisor, scores, classes, valid, mask_probs)
  return detections.detections_to_label_map(det, source_size, mask_threshold, min_score, paint_rule)


def detections_to_source(
  detections: dict[str, np.ndarray],
  scale: np.ndarray,
  source_size: tuple[int, int],
  min_score: float = 0.0,
  paint_rule: str = 'union',
  mask_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
  """Pastes network-resolution detections into their source slices.

  Args:
    detections: boxes float32 [B, D, 4] (y1, x1, y2, x2 in network-input pixels), scores
      [B, D], classes int32 [B, D] (1..K), valid bool [B, D], mask_probs float32 [B, D, m, m].
    scale: float32 [B, 2] network extent / source size per axis (input_pipeline's `scale`).
    source_size: (h, w) of the source slices.
    min_score: detections scoring below this are left out of the class ids (the config's
      model.label_score_threshold); they stay in the instance masks.
    paint_rule: which pixels are painted (model.paint_rule, detections.detections_to_label_map).
    mask_threshold: the mask probability from which a pasted pixel is the detection's
      (model.mask_threshold).
  Returns:
    class ids int32 [B, h, w] (0 = background; a pixel several detections claim goes to the
    highest score x mask probability, `detections.detections_to_label_map`) and the pasted
    instance masks bool [B, D, h, w] (False for invalid detections).
  """
  label_map, masks = _paste_at_source(
    jnp.asarray(detections['boxes'], jnp.float32),
    jnp.asarray(detections['scores']),
    jnp.asarray(detections['classes'], jnp.int32),
    jnp.asarray(detections['valid'], bool),
    jnp.asarray(detections['mask_probs'], jnp.float32),
    jnp.asarray(scale, jnp.float32),
    tuple(int(n) for n in source_size),
    float(mask_threshold),
    float(min_score),
    str(paint_rule),
  )
  return np.asarray(label_map), np.asarray(masks)


def slice_instances(
  classes: np.ndarray, scores: np.ndarray, valid: np.ndarray, masks: np.ndarray
) -> tuple[Instance, ...]:
  """The valid detections of one slice ([D] classes, scores, valid; masks bool [D, h, w]) as
  `Instance`s, highest score first."""
  out = []
  for d in np.flatnonzero(valid):
    mask = masks[d]
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
      crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].copy()
      top, left = int(rows[0]), int(cols[0])
    else:
      crop, top, left = np.zeros((0, 0), bool), 0, 0
    out.append(Instance(int(classes[d]), float(scores[d]), top, left, crop))
  return tuple(sorted(out, key=lambda inst: -inst.score))


# --- whole volumes -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class VolumePrediction:
  """A model's segmentation of one volume.

  class_slices: int32 [n, h, w] class ids per slice at source resolution (slices along
    `plane`, as `readers.slices` cuts them).
  canonical: uint8 [X, Y, Z] label values in canonical RAS+ (spacing `spacing`, mm).
  label_map: uint8 [I, J, K] label values on the file's grid (save with `grid.affine`).
  instances: per slice, the detected instances (None unless asked for).
  network_spacing: in-plane (row, col) mm per pixel the model saw (None when not run through
    `predict_volume`); network_size: the (H, W) of its input.
  unpainted_detections: with a paint_only model (`load_model`), the detections that would have
    painted but found no mask slot, summed over slices (None otherwise); the label map lacks
    them, so a count above 0 calls for a larger model.paint_slots_per_class.
  """

  case_id: str
  plane: str
  class_slices: np.ndarray
  canonical: np.ndarray
  label_map: np.ndarray
  spacing: tuple[float, float, float]
  grid: Any
  instances: tuple[tuple[Instance, ...], ...] | None = None
  network_spacing: tuple[float, float] | None = None
  network_size: tuple[int, int] | None = None
  unpainted_detections: int | None = None

  @property
  def slice_spacing(self) -> tuple[float, float]:
    """The scan's own in-plane (row, col) spacing in mm along `plane`."""
    return tuple(float(mm) for mm in orientation.pixel_spacing(self.spacing, self.plane))


def assemble(
  volume: readers.Volume,
  class_slices: np.ndarray,
  scheme: LabelScheme,
  instances: Sequence[tuple[Instance, ...]] | None = None,
) -> VolumePrediction:
  """Per-slice class ids [n, h, w] of `volume` (sliced along volume.plane) -> the prediction
  on the canonical grid and on the file's grid, in label values."""
  stack = readers.slices(volume)
  expected = stack.images.shape
  if tuple(class_slices.shape) != tuple(expected):
    raise ValueError(
      f'case {volume.case_id}: class maps have shape {class_slices.shape}; '
      f'expected the slice stack shape {expected}'
    )
  values = scheme.to_label_values(class_slices)
  return VolumePrediction(
    case_id=volume.case_id,
    plane=stack.plane,
    class_slices=class_slices,
    canonical=stack.to_canonical(values),
    label_map=stack.to_original(values),
    spacing=tuple(volume.spacing),
    grid=volume.grid,
    instances=None if instances is None else tuple(instances),
  )


def predict_volume(
  model: LoadedModel, volume: readers.Volume, *, keep_instances: bool = False
) -> VolumePrediction:
  """Runs the model over every slice of `volume` and assembles the label map.

  Slices go through `input_pipeline.volume_inputs` (normalised, resized and padded exactly as
  evaluation prepares stored slices) in batches of `model.batch_size` (the last one padded
  with blank slices, so every batch has one static shape: one compile per image size).
  The painted slices are stacked into a volume in which each tissue of
  model.keep_largest_component keeps only its largest 3D connected component
  (`postprocess.keep_largest_component`), and each of model.keep_largest_cluster its largest
  cluster (per side with model.cluster_per_side; `postprocess.keep_largest_cluster`); then each
  cartilage of model.keep_attached loses the components far from its bone
  (`postprocess.keep_attached`).
  keep_instances: also return each slice's detections as source-resolution `Instance`s (for
  mask AP; the detections as the network made them, before that rule).
  """
  inputs = input_pipeline.volume_inputs(volume, model.config)
  images, scale = inputs['image'], inputs['scale']
  stack = readers.slices(volume)
  count, source_size = images.shape[0], stack.images.shape[1:3]
  batch = model.batch_size
  class_slices = np.zeros((count,) + tuple(source_size), np.int32)
  instances: list[tuple[Instance, ...]] = []
  unpainted = None
  for start in range(0, count, batch):
    stop = min(start + batch, count)
    real = stop - start
    chunk = np.zeros((batch,) + images.shape[1:], np.float32)
    chunk[:real] = images[start:stop]
    chunk_scale = np.ones((batch, 2), np.float32)
    chunk_scale[:real] = scale[start:stop]
    out = jax.device_get(model.detect(model.variables, parallel.shard_batch(chunk, model.mesh)))
    out = {k: np.asarray(v) for k, v in out.items()}
    if 'probs' in out:  # a U-Net's class probabilities (semantic.py)
      probs, labels = semantic.probs_to_source(out['probs'], chunk_scale, source_size)
      class_slices[start:stop] = labels[:real]
      if keep_instances:
        for i in range(real):
          instances.append(
            slice_instances(
              *semantic.slice_regions(
                labels[i],
                probs[i],
                len(model.scheme.class_names),
                str(model.config.data.instance_mode),
              )
            )
          )
      continue
    labels, masks = detections_to_source(
      out,
      chunk_scale,
      source_size,
      float(model.config.model.label_score_threshold),
      str(model.config.model.paint_rule),
      float(model.config.model.mask_threshold),
    )
    class_slices[start:stop] = labels[:real]
    if 'unpainted' in out:
      unpainted = (unpainted or 0) + int(out['unpainted'][:real].sum())
    if keep_instances:
      for i in range(real):
        instances.append(
          slice_instances(out['classes'][i], out['scores'][i], out['valid'][i], masks[i])
        )
  class_slices = postprocess.keep_largest_component(
    class_slices,
    postprocess.class_ids(
      model.scheme, model.config.model.keep_largest_component, 'model.keep_largest_component'
    ),
  )
  rule = postprocess.cluster_rule(model.scheme, model.config.model)
  attach = postprocess.attach_rule(model.scheme, model.config.model)
  if rule.ids or attach.pairs:
    canonical = orientation.slices_to_volume(class_slices, stack.plane)
    spacing = stack.grid.canonical_spacing
    if rule.ids:
      canonical = postprocess.keep_largest_cluster(
        canonical, rule.ids, spacing, rule.radius_mm, rule.per_side, rule.min_ml
      )
    if attach.pairs:
      canonical = postprocess.keep_attached(canonical, attach.pairs, spacing, attach.radius_mm)
    class_slices = orientation.volume_to_slices(canonical, stack.plane)
  prediction = assemble(volume, class_slices, model.scheme, instances if keep_instances else None)
  return dataclasses.replace(
    prediction,
    # Every slice of a volume is resized by the same factor.
    network_spacing=tuple(float(mm / f) for mm, f in zip(stack.pixel_spacing, scale[0])),
    network_size=tuple(int(n) for n in images.shape[1:3]),
    unpainted_detections=unpainted,
  )
