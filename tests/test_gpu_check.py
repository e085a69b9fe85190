"bench/gpu_check.py's dry run (--device cpu: CPU against CPU, fp16 skipped) on two methods: it runs every surface, prints its table, and fails when maps differ"
import sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent/'bench'))
gpu_check = pytest.importorskip('gpu_check')


def test_gpu_check_dry_run(capsys):
    "Every surface is compared (the methods, show_cam, top losses, class heatmaps, the CLI's maps), all equal CPU against CPU, and the costs printed"
    assert gpu_check.main(['--device', 'cpu', '--quick', '--methods', 'gradcam,cam']) == 0
    out = capsys.readouterr().out
    rows = {l.split('  ')[0].strip(): l for l in out.splitlines()}
    for k in ('method gradcam', 'method cam', 'show_cam', 'plot_top_losses', 'class_heatmaps', 'CLI explain (.npy maps)'):
        assert k in rows and ' ok ' in rows[k] and 'skipped' in rows[k], out
    assert 'cost of gradcam on cpu' in out and 'cost of cam on cpu' in out and '0 checks failed' in out


def test_gpu_check_fails_on_differences():
    "The check itself: maps that differ by more than the tolerance, or correlate less than asked, are reported"
    import numpy as np
    a = np.linspace(0, 1, 16, dtype=np.float32)
    d, c = gpu_check.compare(a, a + 2e-3)
    assert d > 1e-3 and c > 0.99
    d, c = gpu_check.compare(a, a[::-1])
    assert c < 0
    assert gpu_check.compare(a, np.full_like(a, np.nan))[0] == float('inf')
