"""Ablation sweeps: the variant lists, aggregation against hand-made evaluations, and a tiny
sweep of two variants that trains, evaluates, is killed, resumes and aggregates end to end."""

from __future__ import annotations

import csv
import json
import math
import os

import ml_collections
import numpy as np
import pytest

from conftest import REPO, experiment_config
from imask_jax import configs, errors, sweep
from imask_jax.evaluation import report, sweep_summary

ABLATIONS = os.path.join(REPO, 'experiments', 'ablations.py')
TISSUES = ('femur', 'femoral_cartilage', 'tibia', 'tibial_cartilage')


def test_paper_study_is_two_heads_by_two_backbones_each_head_against_standard():
  c = experiment_config('ablations', 'dataset=phantom_knee,backbones=resnet50+densenet121')
  assert c.experiment == os.path.join(REPO, 'experiments', 'phantom_knee.py')
  assert list(c.variants) == [
    ('standard-resnet50', 'head=standard,backbone=resnet50,points=False', ''),
    ('imask-resnet50', 'head=imask,backbone=resnet50,points=False', 'standard-resnet50'),
    ('standard-densenet121', 'head=standard,backbone=densenet121,points=False', ''),
    (
      'imask-densenet121',
      'head=imask,backbone=densenet121,points=False',
      'standard-densenet121',
    ),
  ]
  assert tuple(c.seeds) == (0,)
  # Every argument loads into the experiment it names, with the settings it says.
  for _, arg, _ in c.variants:
    config = configs.load_experiment(c.experiment, arg)
    assert (config.model.mask_head, config.model.backbone) == tuple(
      part.split('=')[1] for part in arg.split(',')[:2]
    )
    assert not config.model.point_head.enabled


def test_head_and_skip_studies_switch_the_parts_they_name():
  c = experiment_config('ablations', 'study=heads,seeds=0+4,base=smoke+steps=3')
  assert tuple(c.seeds) == (0, 4) and c.base_arg == 'smoke,steps=3'
  by_name = {name: (arg, baseline) for name, arg, baseline in c.variants}
  assert set(by_name) == {'standard', 'imask', 'decoder_only', 'skip_only'}
  decoder_only = configs.load_experiment(c.experiment, by_name['decoder_only'][0])
  skip_only = configs.load_experiment(c.experiment, by_name['skip_only'][0])
  assert (decoder_only.model.imask.decoder, decoder_only.model.imask.skip) == (True, False)
  assert (skip_only.model.imask.decoder, skip_only.model.imask.skip) == (False, True)
  assert all(b == 'standard' for n, (_, b) in by_name.items() if n != 'standard')

  skips = experiment_config('ablations', 'study=skip_size')
  sizes = {
    n: configs.load_experiment(skips.experiment, a).model.imask.skip_size
    for n, a, _ in skips.variants
    if 'skip' in n
  }
  assert sizes == {'imask_skip28': 28, 'imask_skip112': 112}
  assert {b for n, _, b in skips.variants if 'skip' in n} == {'imask'}
  every = experiment_config('ablations', 'study=all')
  assert len(every.variants) == 3 * 4 + 2
  # the paper's heads, without the point head the knee quick start turns on
  for study in ('paper', 'heads', 'skip_size', 'all'):
    c = experiment_config('ablations', f'study={study}')
    models = [configs.load_experiment(c.experiment, arg).model for _, arg, _ in c.variants]
    assert not any(model.point_head.enabled for model in models)


def test_cartilage_study_switches_the_mask_grid_and_the_point_head_against_imask():
  c = experiment_config('ablations', 'study=cartilage')
  levers = {}
  for name, arg, baseline in c.variants:
    model = configs.load_experiment(c.experiment, arg).model
    levers[name] = (model.mask_head, model.imask.skip_size, model.point_head.enabled, baseline)
  assert levers == {
    'imask': ('imask', 56, False, ''),
    'imask_skip112': ('imask', 112, False, 'imask'),
    'imask_points': ('imask', 56, True, 'imask'),
    'imask_skip112_points': ('imask', 112, True, 'imask'),
  }


def test_bad_sweep_arguments_are_named():
  with pytest.raises(ValueError, match='study=.*expected one of'):
    experiment_config('ablations', 'study=nope')
  with pytest.raises(ValueError, match='no experiment file'):
    experiment_config('ablations', 'dataset=nowhere')
  with pytest.raises(ValueError, match=r"unknown arguments \['colour'\]"):
    experiment_config('ablations', 'colour=red')
  c = experiment_config('ablations', 'backbones=resnet50')
  c.variants = c.variants + (('imask-x', 'head=imask,backbone=resnet9', 'standard-resnet50'),)
  with pytest.raises(ValueError, match=r"variant 'imask-x'.*does not load"):
    sweep.plan(c, '/tmp/unused')
  c.variants = (('a', 'head=imask', 'b'),)
  with pytest.raises(ValueError, match="compared with 'b', which is not a variant"):
    sweep.plan(c, '/tmp/unused')


def test_a_second_sweep_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
  first = sweep.SweepLock(str(tmp_path))
  with pytest.raises(RuntimeError, match='another sweep'):
    sweep.SweepLock(str(tmp_path))
  first.close()
  sweep.SweepLock(str(tmp_path)).close()


# --- aggregation on hand-made evaluations ----------------------------------------------------


def _fake_run(
  root, variant: str, seed: int, per_case: dict[str, dict[str, tuple]], ap_all: dict[str, float]
) -> sweep.Run:
  """A finished run: config.json with 10 steps and eval/10/{metrics,ap}.csv holding
  per_case[case][tissue] = (status, dice, hausdorff_voxels, assd_mm, ap)."""
  run = sweep.Run(variant, seed, '', '', os.path.join(root, variant, f'seed{seed}'))
  folder = os.path.join(run.workdir, 'eval', '10')
  os.makedirs(folder)
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    f.write('{"train": {"steps": 10}, "eval": {"split": "test"}}')
  metric_rows, ap_rows = [], []
  for case, tissues in per_case.items():
    for tissue, (status, dice, hd_px, assd, ap) in tissues.items():
      row = {c: 0.0 for c in report.METRICS_COLUMNS}
      row.update(
        case_id=case,
        tissue=tissue,
        label_value=1,
        status=status,
        dice=dice,
        hausdorff_voxels=hd_px,
        assd_mm=assd,
      )
      metric_rows.append(row)
      ap_rows.append(
        {
          **{c: 0 for c in report.AP_COLUMNS},
          **dict(scope=case, tissue=tissue, class_id=1, ap=ap, truth_instances=1, detections=1),
        }
      )
  for tissue, ap in ap_all.items():
    ap_rows.append(
      {
        **{c: 0 for c in report.AP_COLUMNS},
        **dict(scope='all', tissue=tissue, class_id=1, ap=ap, truth_instances=1, detections=1),
      }
    )
  report.write_csv(os.path.join(folder, 'metrics.csv'), report.METRICS_COLUMNS, metric_rows)
  report.write_csv(os.path.join(folder, 'ap.csv'), report.AP_COLUMNS, ap_rows)
  return run


def test_aggregation_means_counts_and_exact_wilcoxon(tmp_path):
  cases = [f'case{i}' for i in range(5)]
  base_dice = [0.70, 0.72, 0.74, 0.71, 0.69]
  gains = [0.01, 0.02, 0.03, 0.04, 0.05]  # all positive: the exact two-sided p is 2 / 2^5
  standard = _fake_run(
    tmp_path,
    'standard',
    0,
    {
      c: {'femoral_cartilage': ('ok', d, 10.0 + i, 0.5, 0.2)}
      for i, (c, d) in enumerate(zip(cases, base_dice))
    },
    {'femoral_cartilage': 0.25},
  )
  per_case = {
    c: {'femoral_cartilage': ('ok', d + g, 9.0 + i, 0.4, 0.3)}
    for i, (c, d, g) in enumerate(zip(cases, base_dice, gains))
  }
  per_case['case4']['femoral_cartilage'] = ('missed', 0.0, math.inf, math.inf, 0.0)
  imask = _fake_run(tmp_path, 'imask', 0, per_case, {'femoral_cartilage': 0.35})
  imask = sweep.Run('imask', 0, 'standard', '', imask.workdir)

  c = ml_collections.ConfigDict(
    dict(
      experiment='x.py',
      base_arg='',
      study='heads',
      seeds=(0,),
      split='test',
      variants=(('standard', 'head=standard', ''), ('imask', 'head=imask', 'standard')),
    )
  )
  text, missing = sweep.aggregate(c, str(tmp_path), [standard, imask])
  assert missing == []

  with open(tmp_path / 'summary.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [(r['variant'], r['case_id']) for r in rows] == [('standard', c) for c in cases] + [
    ('imask', c) for c in cases
  ]
  assert float(rows[5]['ap']) == 0.3 and rows[9]['status'] == 'missed'

  table_row = next(line for line in text.splitlines() if line.startswith('| standard |'))
  dice = np.array(base_dice)
  assert f'{dice.mean():.3f} ± {dice.std(ddof=1):.3f}' in table_row
  assert '| 0.250 |' in table_row  # pooled AP of the single seed
  imask_row = next(line for line in text.splitlines() if line.startswith('| imask |'))
  # The missed volume enters the Dice as 0 and is counted, not averaged, for the distances.
  with_miss = np.array([d + g for d, g in zip(base_dice, gains)][:4] + [0.0])
  assert f'{with_miss.mean():.3f} ± {with_miss.std(ddof=1):.3f}' in imask_row
  assert '(1 of 5 not found)' in imask_row

  n, mean, p, dropped, _ = sweep_summary.paired_comparison(
    sweep_summary.run_rows(standard, sweep.finished_eval_dir(standard, 'test'))
    + sweep_summary.run_rows(imask, sweep.finished_eval_dir(imask, 'test')),
    'imask',
    'standard',
    'femoral_cartilage',
    'assd_mm',
  )
  assert (n, dropped) == (4, 1) and math.isclose(mean, -0.1)
  assert math.isclose(p, 2 / 2**4)  # four pairs, all negative
  assert sweep_summary.wilcoxon(gains) == pytest.approx(2 / 2**5)
  assert sweep_summary.wilcoxon([0.0, 0.0, 0.0]) == 1.0 and math.isnan(
    sweep_summary.wilcoxon([0.1])
  )
  compare = next(line for line in text.splitlines() if line.startswith('| imask | standard'))
  assert '| FC | 5 (1 dropped) |' in compare
  # One tissue: no test over tissues (the paper's granularity needs two values or more).
  assert "paper's granularity" not in text


def test_evaluations_made_before_the_average_hausdorff_column_read_as_missing(tmp_path):
  run = _fake_run(
    tmp_path, 'standard', 0, {'c0': {'femur': ('ok', 0.9, 3.0, 0.5, 0.2)}}, {'femur': 0.25}
  )
  metrics_csv = os.path.join(run.workdir, 'eval', '10', 'metrics.csv')
  rows = sweep_summary.run_rows(run, os.path.dirname(metrics_csv))
  assert rows[0]['average_hausdorff_voxels'] == 0.0 and rows[0]['hausdorff_voxels'] == 3.0
  old = [c for c in report.METRICS_COLUMNS if c != 'average_hausdorff_voxels']
  with open(metrics_csv, newline='') as f:
    kept = [{c: r[c] for c in old} for r in csv.DictReader(f)]
  report.write_csv(metrics_csv, old, kept)
  (row,) = sweep_summary.run_rows(run, os.path.dirname(metrics_csv))
  assert math.isnan(row['average_hausdorff_voxels']) and row['dice'] == 0.9


def test_unfinished_runs_are_listed_not_averaged(tmp_path):
  done = _fake_run(tmp_path, 'a', 0, {'c0': {'femur': ('ok', 0.9, 3.0, 0.5, 0.8)}}, {'femur': 0.8})
  waiting = sweep.Run('b', 0, 'a', '', str(tmp_path / 'b' / 'seed0'))
  os.makedirs(waiting.workdir)
  with open(os.path.join(waiting.workdir, 'config.json'), 'w') as f:
    f.write('{"train": {"steps": 10}, "eval": {"split": "test"}}')
  c = ml_collections.ConfigDict(
    dict(
      experiment='x.py',
      base_arg='',
      study='heads',
      seeds=(0,),
      split='test',
      variants=(('a', '', ''), ('b', '', 'a')),
    )
  )
  text, missing = sweep.aggregate(c, str(tmp_path), [done, waiting])
  assert missing == ['b/seed0'] and 'runs finished: 1 of 2 (not yet: b/seed0)' in text
  assert 'No comparison has finished runs on both sides yet.' in text


# --- the tiny sweep, end to end ----------------------------------------------------------------


def test_changed_run_settings_are_refused_and_new_variants_recorded(tmp_path):
  c = experiment_config('ablations', 'backbones=resnet18,base=smoke+steps=3')
  workdir = str(tmp_path)
  runs = sweep.plan(c, workdir)
  first = sweep.check_plan(c, workdir, runs)
  assert first['imask-resnet18/seed0']['train']['steps'] == 3
  assert sweep.check_plan(c, workdir, runs) == first  # the same settings: accepted again

  c.base_arg = 'smoke,steps=4'
  with pytest.raises(
    errors.SettingsChangedError,
    match=r'standard-resnet18/seed0: train.steps: 3 -> 4.*delete .*sweep_plan',
  ):
    sweep.check_plan(c, workdir, sweep.plan(c, workdir))

  c.base_arg = 'smoke,steps=3'
  c.variants = c.variants + (
    ('decoder_only-resnet18', 'head=imask,skip=False,backbone=resnet18', 'standard-resnet18'),
  )
  grown = sweep.check_plan(c, workdir, sweep.plan(c, workdir))
  assert grown['decoder_only-resnet18/seed0']['model']['imask']['skip'] is False
  with open(tmp_path / 'sweep_plan.json') as f:
    assert len(json.load(f)) == 3

  # A plan recorded before the code added a field: the field counts as its default there, so
  # a default-valued field is no change; one the experiment sets otherwise still is.
  with open(tmp_path / 'sweep_plan.json') as f:
    recorded = json.load(f)
  for settings in recorded.values():
    del settings['model']['attach_radius_mm'], settings['model']['keep_attached']
  with open(tmp_path / 'sweep_plan.json', 'w') as f:
    json.dump(recorded, f)
  with pytest.raises(errors.SettingsChangedError, match=r'model.keep_attached: \(\) -> '):
    sweep.check_plan(c, workdir, sweep.plan(c, workdir))
  for settings in recorded.values():
    settings['model']['keep_attached'] = ['femoral_cartilage', 'tibial_cartilage']
  with open(tmp_path / 'sweep_plan.json', 'w') as f:
    json.dump(recorded, f)
  assert sweep.check_plan(c, workdir, sweep.plan(c, workdir)) == grown


def test_a_unet_run_is_checked_by_its_own_spec():
  config = experiment_config('phantom_knee', 'unet')
  sweep.check_run_config(config)
  config.model.unet.depth = 0
  with pytest.raises(ValueError, match='model.unet.depth=0'):
    sweep.check_run_config(config)


def test_baselines_study_sets_the_unet_beside_both_heads_against_imask():
  c = experiment_config('ablations', 'dataset=phantom_knee,study=baselines')
  by_name = {name: (arg, baseline) for name, arg, baseline in c.variants}
  assert list(by_name) == ['standard', 'imask', 'unet']
  assert by_name['imask'][1] == 'standard' and by_name['unet'][1] == 'imask'
  kinds = {n: configs.load_experiment(c.experiment, a).model for n, (a, _) in by_name.items()}
  assert kinds['unet'].kind == 'unet'
  assert [kinds[n].kind for n in ('standard', 'imask')] == ['maskrcnn', 'maskrcnn']
  assert [kinds[n].mask_head for n in ('standard', 'imask')] == ['standard', 'imask']
