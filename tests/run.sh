#!/usr/bin/env bash
# The whole test suite, as CI runs it (after `pip install -e ".[dev,docs]"`, and Debian's chromium for the docs check):
#   1. the notebooks are clean and the library is exported from them (nbdev-clean / nbdev-export change nothing);
#   2. the demo fine-tunes the pretrained network on photo crops (`fastai-heatmap demo`, caching its weights), and the
#      digits model the tests share is trained and cached (`demo_learner`), for what follows;
#   3. the notebooks' own tests (nbdev-test) and the heavier tests in tests/ (pytest);
#   4. the docs: the site builds offline, README.md is the one generated from nbs/index.ipynb, every link, anchor and
#      image resolves, and headless Chromium renders the pages (docs/check.sh).
# Every stage runs, even after one fails (a failing notebook must not hide pytest's or the docs' results); each prints a
# one-line summary (passed/failed, time), and the exit status is non-zero if any stage failed.
# FASTAI_HEATMAP_SEED=N trains (and caches) the demo models the tests share with seed N: the suite must pass whatever it learned.
set -uo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg PYTHONWARNINGS="ignore::FutureWarning"

summary=()
failed=0
stage() { # stage NAME COMMAND...: run it, keep its output, record passed/failed and its time
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@"
  local rc=$?
  local line
  line=$(printf '%-8s %-10s %5ds  (%s)' "$([ $rc -eq 0 ] && echo passed || echo FAILED)" "$name" $((SECONDS - t0)) "$*")
  [ $rc -eq 0 ] || failed=1
  summary+=("$line")
  echo "=== $line"
}

in_sync() {
  local before after
  before=$(git status --porcelain; git diff)
  nbdev-export && nbdev-clean || return 1
  after=$(git status --porcelain; git diff)
  if [ "$before" != "$after" ]; then
    echo "FAIL: nbdev-export / nbdev-clean changed files: the notebooks are not clean or the library is out of step with them." >&2
    git status --porcelain >&2
    return 1
  fi
}

demo_out=$(mktemp -d)
stage sync    in_sync
demo_models() { fastai-heatmap demo --out "$demo_out" --cached && python -c "from fastai_heatmap.data import demo_learner; demo_learner()"; }
stage demo    demo_models
stage nbdev   nbdev-test --n-workers 2
stage pytest  python -m pytest tests -q --durations=15 --timeout=1800 --ignore=tests/test_docs.py   # the browser test runs in docs/check.sh, on a fresh build
stage docs    bash docs/check.sh

echo
echo "Summary (FASTAI_HEATMAP_SEED=${FASTAI_HEATMAP_SEED:-default}):"
printf '  %s\n' "${summary[@]}"
[ $failed -eq 0 ] && echo "All stages passed." || echo "Some stage failed."
exit $failed
