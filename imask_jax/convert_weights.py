"""`python -m imask_jax.convert_weights`: a torchvision checkpoint -> a msgpack file for
`--config.model.init_from` (see docs/pretrained.md; the conversion is `weights.convert`).

    python -m imask_jax.convert_weights --from resnet50-0676ba61.pth --arch resnet50 \\
        --out weights/resnet50_imagenet.msgpack
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imask_jax.weights import convert, torch_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m imask_jax.convert_weights',
    description='Convert a torchvision checkpoint (.pth or .npz) into an imask_jax msgpack '
    'file for --config.model.init_from.',
  )
  parser.add_argument('--from', dest='source', required=True, help='torchvision .pth or .npz')
  parser.add_argument('--arch', required=True, choices=convert.ARCHS)
  parser.add_argument('--out', required=True, help='output .msgpack path')
  parser.add_argument(
    '--input-channels',
    type=int,
    default=1,
    help='channels of the model input: 2 * data.context_slices + 1 (default 1)',
  )
  parser.add_argument(
    '--input-normalization',
    choices=convert.NORMALIZATIONS,
    default='imagenet',
    help="fold torchvision's ImageNet input normalisation into the stem, for "
    'inputs in [0, 1] (default); none keeps the stem as it is',
  )
  parser.add_argument(
    '--keep-class-layers',
    action='store_true',
    help='maskrcnn only: also convert the COCO class layers (90 classes)',
  )
  args = parser.parse_args(argv)
  state = torch_checkpoint.read_state_dict(args.source)
  converted = convert.convert_state_dict(
    state,
    args.arch,
    input_channels=args.input_channels,
    input_normalization=args.input_normalization,
    keep_class_layers=args.keep_class_layers,
    source=args.source,
  )
  convert.save(
    converted,
    args.out,
    source=os.path.basename(args.source),
    source_sha256=convert.sha256(args.source),
  )
  arrays = len(converted.params) + len(converted.batch_stats)
  print(
    f'{args.source} ({args.arch}): {arrays} arrays -> {args.out}; covers '
    f'{", ".join(converted.covers)}; dropped {len(converted.dropped)} tensors '
    f'({", ".join(converted.dropped) or "none"})'
  )
  for note in converted.notes:
    print(note)
  return 0


if __name__ == '__main__':
  sys.exit(main())
