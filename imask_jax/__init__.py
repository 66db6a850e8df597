"""imask_jax: Mask R-CNN and iMaskRCNN in JAX/Flax for musculoskeletal MRI."""
