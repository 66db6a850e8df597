"""Training: `train` (the loop: validation, checkpoints, the stop rules), `steps` (the train
state and the jitted data-parallel training step), `optim` (the optimiser and its schedule).
Imports the shared modules, the models, the workdir and inference's programs (validation runs
the same detection as evaluation); only `main` imports `train`."""
