"""imask_jax: Mask R-CNN and iMaskRCNN in JAX/Flax for musculoskeletal MRI."""

import os

# TensorFlow (tf.data and TFDS only) prints its C++ start-up chatter unless told before its first
# import; every entry point imports this package first, so setting it here covers them all.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
