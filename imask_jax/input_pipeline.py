"""tf.data input pipeline: stored slice examples -> padded, per-device numpy batches.

Each example is prepared (normalised, resampled to the network's pixel size, padded), cropped
and augmented for training by slice_transforms.py, whose docstring holds the per-example
contract; `volume_inputs` prepares a whole volume's slices the same way for inference.

Batches are dicts of numpy arrays shaped [local_devices, per_device_batch, ...]:
  image [D, B, H, W, C] float32, gt_boxes [D, B, M, 4] float32 (y1, x1, y2, x2 in input
  pixels), gt_classes [D, B, M] int32 (0 = padding), gt_masks [D, B, M, H, W] uint8,
  gt_valid [D, B, M] bool, case_id [D, B] bytes, slice_index [D, B] int32, scale [D, B, 2]
  float32, image_extent [D, B, 2] int32, pixel_spacing [D, B, 2] float32 (source mm),
  example_valid [D, B] bool (False only for the padding of an evaluation's last batch).

TensorFlow is kept off every GPU (JAX owns them). Randomness is stateless and derived from the
seed and the example's position in the stream, so the same seed gives the same batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import readers, slice_examples
from data_pipelines.datasets import builders
from data_pipelines.datasets import params as params_lib
from imask_jax.slice_transforms import (
  CROP_SEED_TAG,
  PrepareSettings,
  augment_example,
  augment_settings,
  bucket_size,
  crop_example,
  finish_batch,
  prepare_example,
  prepare_settings,
  spacing_extent,
)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch spreads: per_device examples on each of local_devices devices."""

  local_devices: int
  per_device: int

  @property
  def local_batch(self) -> int:
    return self.local_devices * self.per_device


def batch_layout(
  global_batch: int, device_count: int, local_device_count: int, name: str = 'train.batch_size'
) -> BatchLayout:
  if global_batch < 1 or global_batch % device_count:
    raise ValueError(
      f'config {name}={global_batch} must be a positive multiple of the number '
      f'of devices ({device_count}) so every device gets the same batch'
    )
  return BatchLayout(local_device_count, global_batch // device_count)


def _device_layout(global_batch: int, name: str) -> BatchLayout:
  return batch_layout(global_batch, jax.device_count(), jax.local_device_count(), name)


# --- datasets --------------------------------------------------------------------------------


def _to_device_batches(ds: tf.data.Dataset, layout: BatchLayout) -> tf.data.Dataset:
  """Prepared examples -> finished batches [local_devices, per_device, ...]."""

  def split(batch):
    batch = finish_batch(batch)
    return {
      k: tf.reshape(v, [layout.local_devices, layout.per_device] + v.shape[1:].as_list())
      for k, v in batch.items()
    }

  ds = ds.batch(layout.local_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _read_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def create_train_dataset(
  config: Any, data_dir: str | os.PathLike, *, seed: int, start_step: int = 0, augment: bool = True
) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of training batches of this process (see the module doc for keys).

  Reads this process's share of 'train' (`tfds.split_for_jax_process`), shuffles
  (`data.shuffle_buffer`), augments unless `augment` is False, and batches
  train.batch_size // jax.device_count() examples per local device. Builds the dataset first
  if it is not stored yet.

  start_step: the first batch is batch `start_step` of the stream a fresh iterator (same seed)
  gives, so a resumed run sees exactly the data it would have seen. The skipped examples are
  read and prepared again, but not augmented (the cheap part of an example).
  """
  if start_step < 0:
    raise ValueError(f'start_step={start_step}; expected >= 0')
  layout = _device_layout(int(config.train.batch_size), 'train.batch_size')
  settings = prepare_settings(config)
  augmentation = augment_settings(config) if augment else None
  builder = builders.prepare(config, data_dir)
  split = tfds.split_for_jax_process(
    'train', process_index=jax.process_index(), process_count=jax.process_count()
  )
  read_config = tfds.ReadConfig(shuffle_seed=seed, options=_read_options())
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  # The buffer holds stored slices, not prepared ones: a slice prepared for the paper's
  # 0.1367 mm is about 7x its stored 0.36 mm size, and 2048 of them held tens of GB. Preparing
  # is one deterministic function per slice, so the order of the stream is the same as when
  # prepared slices were shuffled.
  ds = ds.shuffle(int(config.data.shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
  # image_size when resized to fit; scale-true, the resampled slice (its size follows the
  # scan's field of view), cropped below.
  ds = ds.map(lambda ex: prepare_example(ex, settings), num_parallel_calls=tf.data.AUTOTUNE)
  base_seed = tf.constant([seed, jax.process_index()], tf.int64)

  def randomize(index, example):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    if settings.scale_true:
      crop_seed = tf.random.experimental.stateless_fold_in(example_seed, CROP_SEED_TAG)
      example = crop_example(example, tf.cast(crop_seed, tf.int32), settings)
    if augmentation is None:
      return example
    return augment_example(example, tf.cast(example_seed, tf.int32), augmentation)

  # The random seed of an example is its position in the endless stream, so skipping whole
  # batches of prepared examples resumes the stream exactly.
  ds = ds.repeat().enumerate().skip(start_step * layout.local_batch)
  ds = ds.map(randomize, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(_to_device_batches(ds, layout)))


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """One deterministic pass over a split (re-iterable). num_examples: this process's real
  examples; num_batches: batches per pass, the same on every process (padding examples have
  example_valid False)."""

  dataset: tf.data.Dataset
  num_examples: int
  num_batches: int
  image_size: tuple[int, int]  # (H, W) of every batch's images

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(tfds.as_numpy(self.dataset))

  def __len__(self) -> int:
    return self.num_batches


def create_eval_dataset(
  config: Any, data_dir: str | os.PathLike, split: str, *, max_examples: int | None = None
) -> EvalDataset:
  """This process's share of `split` (optionally its first `max_examples` slices), in stored
  order, without augmentation, batched eval.batch_size // jax.device_count() per device; the
  final batch is completed with zero examples marked example_valid = False.

  Scale-true, whole resampled slices are padded to one size for the pass (`eval_canvas`), the
  same on every process: one compiled program."""
  layout = _device_layout(int(config.eval.batch_size), 'eval.batch_size')
  settings = prepare_settings(config)
  builder = builders.prepare(config, data_dir)
  if split not in builder.info.splits:
    raise ValueError(
      f'split {split!r} is not stored in {builder.data_dir} (it has no cases); '
      f'stored splits: {sorted(builder.info.splits)} (data.split_fractions='
      f'{tuple(config.data.split_fractions)}, '
      f'{params_lib.pattern_note(str(config.data.get("subject_pattern", "") or ""))})'
    )
  stored = builder.info.splits[split].num_examples
  if max_examples is None or int(max_examples) >= stored:
    source = split
  else:
    source = f'{split}[:{int(max_examples)}]'
  shares = tfds.even_splits(source, n=jax.process_count())
  counts = [builder.info.splits[share].num_examples for share in shares]
  num_batches = math.ceil(max(counts) / layout.local_batch)
  mine = shares[jax.process_index()]
  ds = builder.as_dataset(
    split=mine, shuffle_files=False, read_config=tfds.ReadConfig(options=_read_options())
  )
  canvas = eval_canvas(builder, source, settings) if settings.scale_true else settings.image_size
  ds = ds.map(lambda ex: prepare_example(ex, settings, canvas), num_parallel_calls=tf.data.AUTOTUNE)
  padding = num_batches * layout.local_batch - counts[jax.process_index()]
  blank = {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()}
  blank['example_valid'] = tf.constant(False)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
  return EvalDataset(
    _to_device_batches(ds, layout), counts[jax.process_index()], num_batches, tuple(canvas)
  )


def eval_canvas(builder: Any, split: str, settings: PrepareSettings) -> tuple[int, int]:
  """The input size of a scale-true evaluation pass over `split`: the largest resampled slice
  (`spacing_extent`) rounded up to settings.size_multiple (one pass over the stored slices)."""
  ds = builder.as_dataset(
    split=split, shuffle_files=False, read_config=tfds.ReadConfig(options=_read_options())
  )

  def extent(example):
    shape = tf.shape(example['image'])
    return tf.stack(
      spacing_extent(shape[0], shape[1], example['pixel_spacing'], settings.pixel_spacing_mm)
    )

  largest = ds.map(extent, num_parallel_calls=tf.data.AUTOTUNE).reduce(
    tf.zeros([2], tf.int32), tf.maximum
  )
  return bucket_size(largest.numpy(), settings.size_multiple)


def volume_inputs(volume: readers.Volume, config: Any) -> dict[str, np.ndarray]:
  """Every slice of a whole volume prepared exactly as the evaluation pipeline prepares a
  stored slice: image [n, H, W, C] float32, scale [n, 2], image_extent [n, 2], slice_index [n]
  (slices along `volume.plane`; C from data.context_slices). Scale-true, (H, W) is the
  resampled slice's `bucket_size`: scans of one protocol share one compiled program."""
  settings = prepare_settings(config)
  context = int(config.data.context_slices)
  stack = readers.slices(volume)
  percentiles = slice_examples.intensity_percentiles(volume.image)
  no_masks = np.zeros([0] + list(stack.images.shape[1:]), np.uint8)

  def examples():
    for index in range(len(stack)):
      yield {
        'image': slice_examples.context_image(stack.images, index, context),
        'classes': np.zeros([0], np.int32),
        'masks': no_masks,
        'case_id': volume.case_id,
        'slice_index': np.int32(index),
        'pixel_spacing': np.array(stack.pixel_spacing, np.float32),
        'intensity_percentiles': percentiles,
      }

  spec = {
    'image': tf.TensorSpec([None, None, 2 * context + 1], tf.float32),
    'classes': tf.TensorSpec([None], tf.int32),
    'masks': tf.TensorSpec([None, None, None], tf.uint8),
    'case_id': tf.TensorSpec([], tf.string),
    'slice_index': tf.TensorSpec([], tf.int32),
    'pixel_spacing': tf.TensorSpec([2], tf.float32),
    'intensity_percentiles': tf.TensorSpec([len(percentiles)], tf.float32),
  }
  ds = tf.data.Dataset.from_generator(examples, output_signature=spec)
  ds = ds.map(lambda ex: prepare_example(ex, settings), num_parallel_calls=tf.data.AUTOTUNE)
  out = next(iter(tfds.as_numpy(ds.batch(len(stack)))))
  image = out['image']
  if settings.scale_true:  # every slice of a volume resamples to the same extent
    height, width = bucket_size(image.shape[1:3], settings.size_multiple)
    image = np.pad(
      image, [(0, 0), (0, height - image.shape[1]), (0, width - image.shape[2]), (0, 0)]
    )
  return dict(image=image, **{k: out[k] for k in ('scale', 'image_extent', 'slice_index')})
