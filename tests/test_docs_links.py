"""Every relative link in the documentation resolves: to an existing file or folder and, for
`path#anchor` (or `#anchor`) on a markdown file, to one of its headings by GitHub's slug rule.

Checked: README.md, docs/**/*.md and benchmarks/*.md. Inline links and images `[text](target)`
and reference definitions `[label]: target`; links inside fenced code blocks and inline code
spans are not links and are skipped, as are http(s), mailto and other scheme targets. Pure
Python: no JAX, no TensorFlow.
"""

from __future__ import annotations

import glob
import os
import re
import urllib.parse

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FENCE = re.compile(r'^\s*(```|~~~)')
INLINE_CODE = re.compile(r'(`+)(?:(?!\1).)+?\1')
# [text](target "title") and ![alt](target); the target may be wrapped in <...>.
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+"[^"]*")?\s*\)')
REFERENCE = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)')
HEADING = re.compile(r'^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
SCHEME = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*:')


def documentation_files(repo: str = REPO) -> list[str]:
  files = [os.path.join(repo, 'README.md')]
  files += glob.glob(os.path.join(repo, 'docs', '**', '*.md'), recursive=True)
  files += glob.glob(os.path.join(repo, 'benchmarks', '*.md'))
  return sorted(f for f in files if os.path.isfile(f))


def prose_lines(text: str) -> list[tuple[int, str]]:
  """(line number, line) outside fenced code blocks, inline code spans blanked out."""
  out, fence = [], None
  for number, line in enumerate(text.split('\n'), 1):
    m = FENCE.match(line)
    if m:
      if fence is None:
        fence = m.group(1)
      elif m.group(1) == fence:
        fence = None
      continue
    if fence is None:
      out.append((number, INLINE_CODE.sub(lambda c: ' ' * len(c.group(0)), line)))
  return out


def heading_text(markdown: str) -> str:
  """The text GitHub renders for a heading's markdown (code marks, emphasis and links undone)."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', markdown)  # links and images: their text
  text = re.sub(r'<[^>]+>', '', text)  # inline HTML tags
  return text.replace('`', '').replace('*', '')


def github_slug(text: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation removed (letters, digits, '_', '-'
  and spaces kept), each space a hyphen."""
  text = heading_text(text).strip().lower()
  text = ''.join(ch for ch in text if ch.isalnum() or ch in '_- ')
  return text.replace(' ', '-')


def anchors(path: str) -> set[str]:
  """Every heading anchor of a markdown file, repeated slugs numbered -1, -2, ... as GitHub
  does."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  seen: dict[str, int] = {}
  out = set()
  for _, line in prose_lines(text):
    m = HEADING.match(line)
    if not m:
      continue
    slug = github_slug(m.group(2))
    if slug in seen:
      seen[slug] += 1
      out.add(f'{slug}-{seen[slug]}')
    else:
      seen[slug] = 0
      out.add(slug)
  # Explicit HTML anchors (<a name="x"> / id="x") count as well.
  out.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', text))
  return out


def links(path: str) -> list[tuple[int, str]]:
  """(line number, target) of every link in a markdown file."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  out = []
  for number, line in prose_lines(text):
    targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
    m = REFERENCE.match(line)
    if m:
      targets.append(m.group(1))
    out += [(number, t[1:-1] if t.startswith('<') else t) for t in targets]
  return out


def broken_links(path: str) -> list[str]:
  """What is wrong with each relative link of `path`, one line per broken link."""
  problems = []
  rel = os.path.relpath(path, REPO)
  for number, target in links(path):
    if SCHEME.match(target) or target.startswith('//'):
      continue  # http(s), mailto and other schemes
    file_part, _, anchor = target.partition('#')
    file_part = urllib.parse.unquote(file_part)
    resolved = (
      os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
    )
    if not os.path.exists(resolved):
      problems.append(f'{rel}:{number}: {target}: no such file {os.path.relpath(resolved, REPO)}')
      continue
    if anchor and resolved.endswith('.md') and os.path.isfile(resolved):
      if urllib.parse.unquote(anchor).lower() not in anchors(resolved):
        problems.append(
          f'{rel}:{number}: {target}: no heading #{anchor} in {os.path.relpath(resolved, REPO)}'
        )
  return problems


@pytest.mark.parametrize('path', documentation_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
  problems = broken_links(path)
  assert not problems, '\n'.join(problems)


def test_the_checked_files_are_found():
  rel = {os.path.relpath(p, REPO) for p in documentation_files()}
  assert {'README.md', 'benchmarks/README.md', 'docs/evaluation.md'} <= rel


@pytest.mark.parametrize(
  'heading, slug',
  [
    (
      "Measured: the paper's four cells on the knee phantom",
      'measured-the-papers-four-cells-on-the-knee-phantom',
    ),
    (
      'Evaluation and prediction (`imask_jax/evaluate.py`, `predict.py`)',
      'evaluation-and-prediction-imask_jaxevaluatepy-predictpy',
    ),
    ('What `make demo` gives', 'what-make-demo-gives'),
    ('2 x 256 at the end of 2026-12-02', '2-x-256-at-the-end-of-2026-12-02'),
    ('Tests that guard the published numbers', 'tests-that-guard-the-published-numbers'),
  ],
)
def test_github_slug(heading, slug):
  assert github_slug(heading) == slug


def test_a_broken_link_is_reported(tmp_path):
  """The checker itself: a missing file, a missing heading and a good link, in a scratch repo."""
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'a.md').write_text('# Title\n\n## Same\n\n## Same\n')
  page = tmp_path / 'README.md'
  page.write_text(
    '# Top\n'
    '[ok](docs/a.md#title) [ok](docs/a.md#same-1) [ok](#top) [web](https://example.com)\n'
    '[gone](docs/missing.md) ![img](docs/none.png)\n'
    '[bad anchor](docs/a.md#nothing) [bad local](#nowhere)\n'
    '`[code](not/a/link.md)`\n'
    '```\n[fenced](not/a/link.md)\n```\n'
  )
  problems = broken_links(str(page))
  assert len(problems) == 4, problems
  assert any('docs/missing.md' in p for p in problems)
  assert any('docs/none.png' in p for p in problems)
  assert any('#nothing' in p for p in problems)
  assert any('#nowhere' in p for p in problems)
