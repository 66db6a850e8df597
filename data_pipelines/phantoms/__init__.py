"""Procedural MRI phantoms: sagittal DESS-like knees and coronal STIR-like hips.

    from data_pipelines.phantoms import generate_knee, generate_hip, write_dataset
    ph = generate_knee(seed=0)             # Phantom(image, labels, affine, reader_labels, truth)
    write_dataset('hip', num=4, seed=0, out='data/phantom_hip', preview='hip.png')

    ph = generate_knee(seed=0, spacing_mm=0.5, fov_mm=140)  # any in-plane grid, same anatomy
    ph = generate_knee(seed=0, visit=1, thinning={'cMF': 0.1})  # a follow-up, 0.1 mm lost

Command line: python -m data_pipelines.phantoms {knee,hip} --num N --seed S --out DIR
[--preset cpu|full] [--spacing MM] [--fov MM] [--preview PNG] [--visits N --thinning cMF=0.1];
`python -m data_pipelines.phantoms preview --preview PNG` draws a knee and a hip side by side.
"""

from __future__ import annotations

from data_pipelines.phantoms.hip import generate_hip
from data_pipelines.phantoms.knee import generate_knee
from data_pipelines.phantoms.scene import Phantom
from data_pipelines.phantoms.writer import save_preview, write_dataset

__all__ = ['Phantom', 'generate_hip', 'generate_knee', 'save_preview', 'write_dataset']
