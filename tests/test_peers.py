"""What the test suites of pytorch-grad-cam, captum and torch-cam found when their cases were run against fastai_heatmap:
occlusion windows that left pixels uncovered, a model of None, booleans among class indices (CAM on a 1×1 convolution
head is checked against torch-cam in test_reference_libs.py)."""
import warnings
import pytest, torch
from torch import nn
from fastai_heatmap.core import heatmap, explain
from fastai_heatmap.perturbation import window_positions


class PixelSum(nn.Module):
    "Class 0's logit is a positively weighted sum of every pixel, class 1's a constant: covering any pixel of a positive image lowers p_0"
    def __init__(self, h, w):
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(0)) + 0.5)
    def forward(self, x): return torch.stack([(x * self.w).sum((1, 2, 3)) / x[0].numel(), torch.zeros(len(x))], 1)


@pytest.mark.parametrize('size', [(4, 4), (7, 10), (10, 3)])
def test_occlusion_covers_every_pixel(size):
    "For any window and stride (a stride larger than the window too), every pixel is covered: maps are finite and every pixel's drop is seen"
    H, W = size
    x = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(1)) + 0.5
    model = PixelSum(H, W)
    for win in range(1, min(H, W) + 1):
        for st in range(1, 6):
            for n in (H, W):
                pos = window_positions(n, win, st)
                covered = torch.zeros(n, dtype=torch.bool)
                for p in pos: covered[p:p+win] = True
                assert covered.all(), (n, win, st, pos)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                raw = heatmap(model, x, method='occlusion', window=win, stride=st, targets=0, norm=None)
                normed = heatmap(model, x, method='occlusion', window=win, stride=st, targets=0)
            assert torch.isfinite(raw).all() and torch.isfinite(normed).all(), (win, st)
            assert (raw > 0).all(), (win, st)  # every pixel lowers p_0 when covered
            if win < min(H, W): assert (normed.flatten(1).amax(1) == 1).all(), (win, st)  # never the all-zero map of a NaN
            assert any('larger than the window' in str(o.message) for o in w) == (st > win), (win, st)


def test_window_positions():
    assert window_positions(4, 1, 2) == [0, 1, 2, 3]
    assert window_positions(10, 4, 4) == [0, 4, 6]
    assert window_positions(10, 3, 5) == [0, 3, 6, 7]


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.mark.parametrize('model', [None, 'resnet18', lambda x: x, 3], ids=['None', 'str', 'function', 'int'])
def test_model_that_is_not_a_module(model):
    with pytest.raises(TypeError, match=r'`model` should be a PyTorch module'): explain(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match=r'`model` should be a PyTorch module'): heatmap(model, torch.randn(2, 3, 8, 8))


def test_learner_as_model(tiny):
    "A Learner passed where the engine takes a model: the message says what to pass"
    class FakeLearner: model, dls = tiny, None
    with pytest.raises(TypeError, match=r'pass `learn.model`'): heatmap(FakeLearner(), torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize('targets', [[False, 0], [0, True], [[0, 1], [True, 2]], (False, 1)], ids=str)
def test_bools_refused_in_target_lists(tiny, targets):
    "A bool is not a class index, alone (as before) or inside a list"
    with pytest.raises(TypeError, match='bool'): heatmap(tiny, torch.randn(2, 3, 8, 8), targets=targets)
