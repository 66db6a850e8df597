"""Writes the split a run used as a split file, to share it or to pin it for later runs.

  python tools/write_split_file.py --workdir runs/stiho --out splits/stiho.json

The workdir's config.json decides the dataset and how its cases were split (by subject hash,
an official test set, or a split file of its own), exactly as training and evaluation read it;
the file lists the case ids of each split (docs/data.md, "Split files"). Another run given
`--config.data.split_file=splits/stiho.json` then trains, validates and tests on exactly these
cases, whatever its own split settings, and `evaluate` of it names the file.
"""

from __future__ import annotations

import argparse
import sys

from data_pipelines.datasets import params as params_lib
from data_pipelines.datasets import sources
from data_pipelines.datasets import split_file as split_file_lib
from imask_jax import workdir as workdir_lib


def split_ids(config, data_dir: str) -> dict[str, list[str]]:
  """Split name -> the case ids in it, as the run with `config` reads them."""
  params = params_lib.params_from_config(config, data_dir)
  folder = sources.open_folder(params, data_dir)
  return {
    split: [case.case_id for case in cases]
    for split, cases in sources.split_assignment(params, folder).items()
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a training run (its config.json)')
  parser.add_argument('--out', required=True, help='the split file to write (JSON)')
  args = parser.parse_args(argv)
  config = workdir_lib.load_config(args.workdir)
  data_dir = workdir_lib.data_dir_for(config, args.workdir)
  ids = split_ids(config, data_dir)
  params = params_lib.params_from_config(config, data_dir)
  origin = params.split_file or params.source_dir or 'generated phantoms'
  path = split_file_lib.write(
    args.out, ids, description=f'the split of {args.workdir} ({params.dataset}, {origin})'
  )
  counts = ', '.join(f'{split} {len(ids[split])}' for split in params_lib.SPLITS)
  print(f'{path}: {counts}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
