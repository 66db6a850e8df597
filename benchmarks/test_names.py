"""The benchmarks name only what the package has: every `from imask_jax... import X` (or
data_pipelines) in a benchmark script, at any depth, imports, and every `X.attr` it reads
exists. The scripts import lazily inside functions and run only by hand, so a package
regroup would otherwise break them silently."""

from __future__ import annotations

import ast
import glob
import importlib
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ('imask_jax', 'data_pipelines')


def _imported(module: str, name: str):
  """`from module import name`: a submodule, else an attribute of the module."""
  try:
    return importlib.import_module(f'{module}.{name}')
  except ModuleNotFoundError:
    return getattr(importlib.import_module(module), name)


def _references(path: str) -> list[tuple[int, str, str]]:
  """(line, bound name, attribute read) of every `X.attr` where X came from our packages,
  plus (line, name, '') for each such import itself."""
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  bound: dict[str, tuple[str, str]] = {}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in PACKAGES:
      for alias in node.names:
        bound[alias.asname or alias.name] = (node.module, alias.name)
        out.append((node.lineno, alias.asname or alias.name, ''))
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in bound
    ):
      out.append((node.lineno, node.value.id, node.attr))
  return [(line, name, attr, *bound[name]) for line, name, attr in out]


SCRIPTS = sorted(
  p for p in glob.glob(os.path.join(HERE, '*.py')) if not os.path.basename(p).startswith('test_')
)


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_every_package_name_a_benchmark_reads_exists(path):
  missing = []
  for line, name, attr, module, imported in _references(path):
    try:
      target = _imported(module, imported)
    except (ImportError, AttributeError) as error:
      missing.append(f'{os.path.basename(path)}:{line}: from {module} import {imported}: {error}')
      continue
    if attr and not hasattr(target, attr):
      missing.append(f'{os.path.basename(path)}:{line}: {name}.{attr} ({module}.{imported})')
  assert not missing, '\n'.join(missing)
