#!/usr/bin/env bash
# The whole test suite, as CI runs it (after `pip install -e ".[dev,docs]"`, and Debian's chromium for the docs check):
#   1. the notebooks are clean and the library is exported from them (nbdev-clean / nbdev-export change nothing);
#   2. the demo trains the embedded model (and caches its weights for what follows);
#   3. the notebooks' own tests (nbdev-test) and the heavier tests in tests/ (pytest);
#   4. the docs: the site builds offline, README.md is the one generated from nbs/index.ipynb, every link, anchor and
#      image resolves, and headless Chromium renders the pages (docs/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg PYTHONWARNINGS="ignore::FutureWarning"

snapshot() { git status --porcelain; git diff; }
before=$(snapshot)
nbdev-export
nbdev-clean
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-export / nbdev-clean changed files: the notebooks are not clean or the library is out of step with them." >&2
  git status --porcelain >&2
  exit 1
fi
echo "ok: notebooks clean, library in sync"

demo_out=$(mktemp -d)
time fastai-heatmap demo --out "$demo_out" --cached
time nbdev-test --n-workers 2
time python -m pytest tests -q --durations=15 --timeout=1800 --ignore=tests/test_docs.py   # the browser test runs in docs/check.sh, on a fresh build
time bash docs/check.sh
