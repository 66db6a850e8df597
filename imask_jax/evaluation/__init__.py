"""Evaluation's outputs: `report` (the CSV rows and the paper-style tables of summary.md). The
command is `python -m imask_jax.evaluate`; `sweep` builds its comparisons from the same tables.
Measuring stays in `metrics/` and drawing in `viz.py`: nothing here measures or draws."""
