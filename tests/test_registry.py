"""One list of methods, everywhere (issue 18): every list of methods that users read or that the project runs comes from the
registry (`method_names()`), and each test here fails when one of them misses a registered method."""
import importlib.util, json, re, subprocess, sys
from pathlib import Path
import pytest
from fastai_heatmap.core import method_names, get_method

ROOT = Path(__file__).parents[1]
NAMES = method_names()


def _cell(nb, start):
    return next(c for c in json.loads((ROOT/'nbs'/nb).read_text())['cells'] if ''.join(c['source']).startswith(start))


def test_methods_at_a_layer_are_the_ones_that_use_one():
    "'Methods at a layer' means `uses_layer`, not the CAM family: Guided Grad-CAM (input gradients family) is one, FullGrad (CAM family, no layer) is not"
    at = method_names(uses_layer=True)
    assert at == [n for n in NAMES if get_method(n).uses_layer]
    assert 'guided_gradcam' in at and 'fullgrad' not in at and 'fullgrad' in method_names('cam')
    assert sorted(at + method_names(uses_layer=False)) == sorted(NAMES)


def test_cli_choices_are_the_registry():
    "`fastai-heatmap explain --help` names every method"
    out = subprocess.run([sys.executable, '-m', 'fastai_heatmap.cli', 'explain', '--help'], capture_output=True, text=True, check=True).stdout
    listed = re.sub(r'\s+', ' ', out.split('one of:', 1)[1])
    assert [n for n in NAMES if not re.search(rf'(?<![\w+-]){re.escape(n)}(?![\w+-])', listed)] == []


def test_benchmark_runs_every_method():
    spec = importlib.util.spec_from_file_location('benchmark', ROOT/'bench'/'benchmark.py')
    bench = sys.modules['benchmark'] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert [n for n in NAMES if n not in bench.select_methods(None)] == []


def test_test_parametrisations_are_the_registry():
    "The per-method tests run every method"
    sys.path.insert(0, str(ROOT/'tests'))
    import test_methods, test_surfaces
    for f in (test_methods.test_every_method_every_arch, test_methods.test_several_targets_from_one_pass, test_methods.test_signed_maps):
        params = next(m.args[1] for m in f.pytestmark if m.name == 'parametrize' and m.args[0] == 'name')
        assert list(params) == NAMES, f.__name__
    for mod in ('test_wrappers', 'test_invariants', 'test_tasks'): assert importlib.import_module(mod).METHODS == NAMES


def test_methods_page_lists_every_method():
    "The methods page's stored `list_methods()` table has a row for every method (rerun nbs/methods.ipynb after adding one), and its gallery's grid is sized from the registry"
    html = ''.join(_cell('methods.ipynb', 'list_methods()')['outputs'][0]['data']['text/html'])
    assert [n for n in NAMES if f'<td>{n}</td>' not in html] == []
    src = ''.join(_cell('methods.ipynb', 'learn = demo_learner()')['source'])
    assert 'method_names()' in src and 'len(names)' in src


def test_index_page_lists_every_method():
    "The home page (and the README made from it) names every method, as users type it"
    text = ''.join(''.join(c['source']) for c in json.loads((ROOT/'nbs'/'index.ipynb').read_text())['cells'] if c['cell_type'] == 'markdown')
    assert [n for n in NAMES if f'`{n}`' not in text] == []
