"""Prediction on new scans (`python -m imask_jax.predict`): `plan` (inputs, outputs, shards and
the refusals), `stages` (read, segment, write; sequential or pipelined), `command` (the command
line), `scan_report` (the per-scan JSON) and `quality` (flags of a probably wrong prediction).
Imports `inference`, `workdir`, `metrics` and `data_pipelines`; nothing imports it. The
contract (what is read, written and refused): docs/predict.md."""
