#!/usr/bin/env bash
# Builds the docs site into _site/ (offline) and README.md from nbs/index.ipynb:
#   1. nbdev-proc-nbs (docs/proc_nbs.py: nbdev's, minus its Quarto install): processed notebooks in _proc/, with
#      the show_doc entries;
#   2. docs/nb2md.py: the processed notebooks as Markdown pages in _mkdocs/docs/ (figures as PNG files next to
#      them), _mkdocs/mkdocs.yml (navigation from nbs/sidebar.yml), README.md (+ README_files/);
#   3. mkdocs build --strict (settings in docs/mkdocs.yml): the site in _site/.
# Needs: pip install -e ".[dev,docs]"
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1 MPLBACKEND=Agg PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning"
rm -rf _proc   # processed afresh: show_doc output depends on the library, not only on its own notebook
python docs/proc_nbs.py
python docs/nb2md.py
rm -rf _site
mkdocs build --strict --quiet -f _mkdocs/mkdocs.yml
echo "site: _site/index.html ($(find _site -name '*.html' | wc -l) pages)"
