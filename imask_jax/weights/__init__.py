"""Pretrained weights: reading torchvision checkpoints without torch (`torch_checkpoint`),
converting them into our parameter trees (`convert`), and merging a converted file into a
freshly initialised model (`pretrained`, `model.init_from`). Imports `models` and `run_log`
only; nothing here trains or reads data. docs/pretrained.md describes the whole path."""
