"Beyond one label per image (issue 17): `score=` for every method, segmentation learners, regression learners"
import warnings
import numpy as np, pytest, torch
from torch import nn
from fastai_heatmap.core import heatmap, explain, method_names
from conftest import fast_options, close_to

METHODS = method_names()


class Small(nn.Module):
    "A small CNN: two convolutions with BatchNorm → global average pooling → Linear (so that CAM applies)"
    def __init__(self, n_out=6):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, n_out)
    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.relu2(self.bn2(self.conv2(x)))).flatten(1))


def _small(seed=0):
    torch.manual_seed(seed)
    m = Small().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2): bn.running_mean.normal_(0, .3); bn.running_var.uniform_(.5, 1.5)
        m.fc.weight.mul_(8); m.fc.bias.zero_() # probabilities that move with the input (LIME's Lasso keeps features)
    return m


def _x(n=2, size=16, seed=1): return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

KW = dict(lime=dict(alpha=1e-5))

def _run(model, x, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return explain(model, x, method=name, norm=None, bar=False, **{**fast_options(name), **KW.get(name, {}), **kw})


# ------------------------------------------------------------------------------------------------ score=
@pytest.mark.parametrize('name', METHODS)
def test_score_of_one_logit_is_targets(name):
    "`score=lambda o: o[:, 3]` is `targets=3` for every method: gradients differentiate it, perturbations evaluate it on the probabilities"
    model, x = _small(), _x()
    ref = _run(model, x, name, targets=3, relu=False)
    e = _run(model, x, name, score=lambda o: o[:, 3], relu=False)
    close_to(e.maps, ref.maps, 1e-5)
    assert (e.targets == -1).all() and e.maps.shape == ref.maps.shape


@pytest.mark.parametrize('name', METHODS)
def test_score_of_a_logit_difference(name):
    "A logit difference: for the methods linear in the score (gradients at a layer or the input, CAM), the map is the difference of the classes' maps"
    model, x = _small(), _x()
    e = _run(model, x, name, score=lambda o: o[:, 3] - o[:, 1], relu=False)
    assert e.maps.shape == (2, 16, 16) and torch.isfinite(e.maps).all()
    if name in ('gradcam', 'cam', 'hirescam', 'saliency', 'input_x_gradient', 'integrated_gradients', 'gradientshap'):
        a, b = (_run(model, x, name, targets=t, relu=False, **({'reduce': 'sum'} if name in ('saliency', 'input_x_gradient', 'integrated_gradients', 'gradientshap') else {})) for t in (3, 1))
        d = _run(model, x, name, score=lambda o: o[:, 3] - o[:, 1], relu=False, **({'reduce': 'sum'} if name in ('saliency', 'input_x_gradient', 'integrated_gradients', 'gradientshap') else {}))
        close_to(d.maps, a.maps - b.maps, 1e-4)


def test_score_with_the_samples():
    "A score may take a second argument, each output's sample: per-sample weights, equal to explaining each sample's own class (also through SmoothGrad's noisy copies and occlusion's batches)"
    model, x = _small(), _x(3)
    t = torch.tensor([0, 4, 2])
    for name, kw in (('gradcam', {}), ('gradcam', dict(smooth=3)), ('occlusion', {}), ('scorecam', {})):
        ref = _run(model, x, name, targets=t, **kw)
        e = _run(model, x, name, score=lambda o, rows: o[torch.arange(len(o)), t[rows]], **kw)
        close_to(e.maps, ref.maps, 1e-5)


def test_score_bad_input():
    model, x = _small(), _x()
    with pytest.raises(ValueError, match=r'one number per output, a tensor of shape \(2,\)'): heatmap(model, x, score=lambda o: o)
    with pytest.raises(ValueError, match='not both'): heatmap(model, x, targets=1, score=lambda o: o[:, 1])
    with pytest.raises(TypeError, match='function of the model'): heatmap(model, x, score=3)
    with pytest.raises(ValueError, match='`region` is for segmentation'): heatmap(model, x, targets=1, region=(0, 0, 2, 2))
