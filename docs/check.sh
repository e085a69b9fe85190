#!/usr/bin/env bash
# The docs check, as CI runs it (after `pip install -e ".[dev,docs]"` and `apt-get install -y chromium chromium-driver`):
#   1. builds the site and README.md (docs/build.sh); the build must change no tracked file: README.md (and
#      README_files/) are generated from nbs/index.ipynb, so a README edited by hand, or a notebook changed without
#      running the build, fails here (run `bash docs/build.sh` and commit the result);
#   2. every internal link, anchor and image of _site/ resolves, nothing is loaded from the internet, and README.md's
#      images are files of the repository (docs/check_site.py);
#   3. the Markdown conversion's tests, and a headless Chromium renders the pages (tests/test_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."

snapshot() { git status --porcelain --untracked-files=all; git diff; }
before=$(snapshot)
time bash docs/build.sh
after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "FAIL: the docs build changed files. README.md is generated from nbs/index.ipynb: run 'bash docs/build.sh' and commit what it writes." >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
echo "ok: the build changed no tracked file (README.md in step with nbs/index.ipynb)"
python docs/check_site.py _site --readme README.md
DOCS_REQUIRE_BROWSER=1 python -m pytest tests/test_nb2md.py tests/test_docs.py -q -p no:cacheprovider
