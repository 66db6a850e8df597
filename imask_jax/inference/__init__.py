"""Inference: a trained model over whole volumes, as evaluate and predict run it.

`loading` (a workdir's checkpoint ready to run, an unlabelled scan read), `programs` (the jitted
detection and segmentation programs, one per input size; training's validation runs them too),
`whole_volume` (slices in, detections pasted at the scan's own slice resolution, a label map on
its exact grid out), `semantic` (the U-Net's probabilities back to the scan's slice grid),
`postprocess` (the largest component and cluster rules). Imports the shared modules, the models
and the workdir; nothing of training. The package itself imports nothing, so that `configs` can
check settings against `postprocess` without loading JAX.
"""
