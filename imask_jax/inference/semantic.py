"""The U-Net's inference (`model.kind = 'unet'`): whole slices -> class probabilities ->
label maps at the scan's own slice resolution, and per-slice instances for mask AP.

  images [N, H, W, C]  --Segmenter-->  probs [N, H, W, K + 1], label_map [N, H, W] at network
                                       pixels (what validation reads, as Mask R-CNN's Detector)
  probs + scale        --probs_to_source-->  probabilities resampled to the [h, w] source
                                       slice, then argmax: class ids [N, h, w]
  class ids + probs    --slice_regions-->  one instance per class (or per connected component)
                                       of each slice, scored by its mean class probability

Back-mapping. The input pipeline resizes a [h, w] slice to (h, w) x `scale` with half-pixel
centres (tf.image.resize) and pads bottom/right, so source pixel r's centre r + 0.5 sits at
network coordinate (r + 0.5) x scale. The probabilities are interpolated there (linearly,
averaging over the footprint where the source is coarser, `jax.image.scale_and_translate`)
and only then turned into class ids, as nnU-Net exports its predictions: a label map is never
resampled, so class borders fall between network pixels where the probabilities cross.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import instances as instances_lib


@functools.partial(jax.jit, static_argnames=('source_size',))
def _resample(probs, scale, source_size):
  def one(p, s):
    # Output (source) coordinate x maps to input (network) coordinate x * s: the resampling
    # scale, output / input, is 1 / s.
    return jax.image.scale_and_translate(
      p,
      source_size + p.shape[-1:],
      (0, 1),
      1.0 / s,
      jnp.zeros(2, jnp.float32),
      method='linear',
      antialias=True,
    )

  out = jax.vmap(one)(probs.astype(jnp.float32), scale.astype(jnp.float32))
  return out, jnp.argmax(out, axis=-1).astype(jnp.int32)


def probs_to_source(
  probs: np.ndarray, scale: np.ndarray, source_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
  """Network-resolution probabilities -> the source slices.

  probs: float32 [B, H, W, K + 1] (the padded network input's); scale: float32 [B, 2] network
  extent / source size per axis (input_pipeline's `scale`); source_size: (h, w).
  Returns (probabilities float32 [B, h, w, K + 1], class ids int32 [B, h, w], their argmax).
  """
  out, classes = _resample(
    jnp.asarray(probs, jnp.float32),
    jnp.asarray(scale, jnp.float32),
    tuple(int(n) for n in source_size),
  )
  return np.asarray(out), np.asarray(classes)


def slice_regions(
  class_ids: np.ndarray, probs: np.ndarray, num_classes: int, mode: str = 'per_class'
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A slice's segmentation as scored instances, for mask AP (`inference.slice_instances`).

  class_ids: int [h, w] (0..K); probs: float32 [h, w, K + 1]; mode: the config's
  data.instance_mode ('per_class': one instance per class present, 'components': one per
  8-connected component, as the truth instances are cut). Returns classes int32 [D], scores
  float32 [D] (the mean probability of the instance's class over its pixels), valid bool [D]
  and masks bool [D, h, w].
  """
  found = instances_lib.extract_instances(
    class_ids, {c: c for c in range(1, num_classes + 1)}, mode=mode, min_pixels=1
  )
  scores = np.array(
    [probs[..., c][m].mean() for c, m in zip(found.classes, found.masks)], np.float32
  )
  valid = np.ones(len(found.classes), bool)
  return found.classes, scores, valid, found.masks
