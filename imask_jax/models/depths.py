"""The depths of the backbone bodies and their block layouts, as plain data without flax, so that
a command can list them before it imports the models (`convert_weights --help`).
`resnet.RESNET_STAGES` and `densenet.DENSENET_BLOCKS` are built from these tables."""

from __future__ import annotations

# ResNet depth -> (block kind, blocks per stage), as in He et al. 2016, Table 1.
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}

# DenseNet depth -> dense layers per block (Huang et al. 2017, Table 1).
DENSENET_BLOCKS: dict[int, tuple[int, int, int, int]] = {
  121: (6, 12, 24, 16),
  169: (6, 12, 32, 32),
}
