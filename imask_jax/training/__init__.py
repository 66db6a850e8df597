"""Training: `train` (the loop: validation, checkpoints, the stop rules), `steps` (the train
state, the jitted data-parallel training step and the detection / segmentation programs that
evaluation and prediction load through `inference`), `optim` (the optimiser and its schedule).
Imports the shared modules, the models and the workdir; only `main` imports `train`."""
