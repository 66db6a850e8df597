"""A sweep variant's name is its run folder's name (DIR/<variant>/seed<k>): names that would put
the run outside DIR ('..', issue 15.6), out of sight ('.', '.x') or in another folder (a path
separator) are refused before anything is planned."""

from __future__ import annotations

import os
import re

import ml_collections
import pytest

from imask_jax import sweep


def _sweep(name: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      'experiment': 'experiments/phantom_knee.py',
      'base_arg': 'smoke',
      'seeds': (0,),
      'variants': (('baseline', '', ''), (name, 'head=standard', 'baseline')),
    }
  )


@pytest.mark.parametrize('name', ['..', '.', '.hidden', 'a/b', '../escape', 'a\\b', '', 'x y'])
def test_names_that_are_not_a_plain_folder_name_are_refused(name, tmp_path):
  message = re.escape(f'sweep config: variant name {name!r} must be letters')
  with pytest.raises(ValueError, match=message):
    sweep.plan(_sweep(name), str(tmp_path / 'sweep'))
  assert not os.path.exists(tmp_path / 'sweep')


def test_plain_names_stay_inside_the_sweep_folder(tmp_path):
  runs = sweep.plan(_sweep('head.standard-2_b'), str(tmp_path / 'sweep'))
  root = os.path.join(str(tmp_path), 'sweep') + os.sep
  assert [r.workdir for r in runs] == [root + 'baseline/seed0', root + 'head.standard-2_b/seed0']
