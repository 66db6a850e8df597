"""Evaluation: a checkpoint over held-out volumes (`held_out`), one volume measured (`case_metrics`,
with the knee's side and subregions in `knee_steps`), the CSV rows and paper-style tables
(`report/`), the figures (`viz`), and the paper's tables and figures from evaluated runs
(`paper/`). The command is `python -m imask_jax.evaluate`; `sweep` builds its comparisons from
the same tables. The measures themselves are `metrics/`'s: nothing here defines one. Imports
the shared modules, metrics and (where a model runs) inference; nothing of training."""
