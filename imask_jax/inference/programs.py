"""The jitted, data-parallel programs that run a model over batches of slices: Mask R-CNN's
detection (`Detector`) and the U-Net's segmentation (`Segmenter`), one compiled program per input
size. Training's validation and whole-volume inference run the same programs.

Each is per-device code in `jax.shard_map` inside `jax.jit` over the 1-D `data` mesh (pmap
semantics; see parallel.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from imask_jax import parallel
from imask_jax.inference import sliding_window
from imask_jax.models import detections
from imask_jax.models.mask_rcnn import MaskRCNN
from imask_jax.models.unet import UNet


class Detector(parallel.ProgramsBySize):
  """jit(shard_map(detect + paste)): (variables, images [N, H, W, C]) -> dict of per-example
  arrays: label_map int32 [N, H, W] (class ids), boxes, scores, classes, valid, mask_probs;
  with `paint_only` (`MaskRCNN.detect`) only the detections that paint, and unpainted [N].
  One program per input size, built with the model `at_size` (H, W)."""

  def __init__(self, model: MaskRCNN, mesh: jax.sharding.Mesh, paint_only: bool = False):
    super().__init__()
    self.model = model
    self.mesh = mesh
    self.paint_only = paint_only

  def build(self, image_size: tuple[int, int]):
    return _jitted_detect(MaskRCNN(self.model.spec.at_size(image_size)), self.mesh, self.paint_only)


def make_detect_fn(
  model: MaskRCNN | UNet, mesh: jax.sharding.Mesh, paint_only: bool = False
) -> Detector | Segmenter:
  """The model's detection for any input size (`Detector`); a U-Net's segmentation
  (`Segmenter`: probs and label_map; paint_only does not apply)."""
  if isinstance(model, UNet):
    return Segmenter(model, mesh)
  return Detector(model, mesh, paint_only)


def _jitted_detect(model: MaskRCNN, mesh: jax.sharding.Mesh, paint_only: bool):
  def per_device(variables, images):
    det = model.apply(variables, images, paint_only, method=MaskRCNN.detect)
    label_map, _ = detections.detections_to_label_map(
      det,
      model.spec.image_size,
      threshold=model.spec.mask_threshold,
      min_score=model.spec.label_score_threshold,
      paint_rule=model.spec.paint_rule,
    )
    out = dict(
      label_map=label_map,
      boxes=det.boxes,
      scores=det.scores,
      classes=det.classes,
      valid=det.valid,
      mask_probs=det.mask_probs,
    )
    if det.unpainted is not None:
      out['unpainted'] = det.unpainted
    return out

  return _data_parallel(per_device, mesh)


class Segmenter(parallel.ProgramsBySize):
  """jit(shard_map(segment)): (variables, images [N, H, W, C]) -> {'probs' float32 [N, H, W,
  K + 1], 'label_map' int32 [N, H, W]}: `Detector`'s interface, one program per input
  size (the net takes any size). With the spec's `sliding_window`, an input larger than the
  trained crop (`spec.image_size`) in either axis is run in windows of that size
  (`sliding_window.window_logits`); one that fits runs whole, as without it."""

  def __init__(self, model: UNet, mesh: jax.sharding.Mesh):
    super().__init__()
    self.model = model
    self.mesh = mesh

  def windowed(self, image_size: tuple[int, int]) -> bool:
    """Whether inputs of `image_size` (H, W) run in sliding windows."""
    s = self.model.spec
    return bool(s.sliding_window) and any(n > w for n, w in zip(image_size, s.image_size))

  def build(self, image_size: tuple[int, int]):
    return _jitted_segment(self.model, self.mesh, self.windowed(image_size))


def _jitted_segment(model: UNet, mesh: jax.sharding.Mesh, windowed: bool = False):
  s = model.spec

  def per_device(variables, images):
    if windowed:
      logits = sliding_window.window_logits(
        lambda crop: model.apply(variables, crop, False)[0],
        images,
        s.image_size,
        s.window_overlap,
        multiple=s.size_multiple,
        gaussian=s.window_gaussian,
      )
      probs = jax.nn.softmax(logits, axis=-1)
    else:
      probs = model.apply(variables, images, method=UNet.segment)
    return dict(probs=probs, label_map=jnp.argmax(probs, axis=-1).astype(jnp.int32))

  return _data_parallel(per_device, mesh)


def _data_parallel(per_device, mesh: jax.sharding.Mesh):
  """jit(shard_map(per_device)) over the data axis: (variables replicated, images split by
  example) -> per-example outputs split the same way."""
  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(parallel.DATA_AXIS)),
      out_specs=P(parallel.DATA_AXIS),
      check_vma=False,
    )
  )
