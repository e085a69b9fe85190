"""What every method must leave alone, and the conditions it must work under. Parametrized over the method registry,
so a method added later is covered without new test code:

- no hook left over 1000 calls, a quarter of which raise;
- the model's training flags, `requires_grad`, `.grad`, parameters and BatchNorm buffers unchanged (a model in train
  mode, partly frozen, with gradients already in `.grad`), and the caller's grad mode too;
- the same maps under `torch.no_grad()`, `torch.inference_mode()`, with every parameter frozen, and in `channels_last`;
- CPU bfloat16 autocast: float32 maps close to the float32 ones;
- in-place ReLUs, `F.relu` and `Tensor.relu` in the model (the small model below has all three).
"""
import warnings
import pytest, torch, torchvision
import torch.nn.functional as F
from torch import nn
from fastai_heatmap.core import heatmap, explain, method_names
from conftest import model_state, assert_same_state, fast_options

METHODS = method_names()


class Small(nn.Module):
    "A small CNN with BatchNorm, an in-place ReLU module, a functional ReLU, a Tensor.relu, and a ReLU module → pooling → Linear head"
    def __init__(self, n_out=4):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv3, self.conv4, self.act = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, n_out)
    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.act(self.conv4(self.conv3(x).relu()))
        return self.fc(self.pool(x).flatten(1))


def _small(seed=0):
    torch.manual_seed(seed)
    m = Small()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (m.bn1, m.bn2): bn.running_mean.normal_(0, .3); bn.running_var.uniform_(.5, 1.5)
    return m


def _x(n=2, size=16, seed=1): return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model, x, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return heatmap(model, x, method=name, **{**fast_options(name), **kw})


@pytest.mark.parametrize('name', METHODS)
def test_no_hooks_left_over_many_calls(name):
    "1000 calls, every fourth one raising (a class out of range): no hook, no global hook, nothing growing"
    model = _small().eval()
    x = _x(1, 8)
    before = model_state(model)
    for i in range(1000):
        if i % 4 == 3:
            with pytest.raises(IndexError): _run(model, x, name, targets=99)
        else: _run(model, x, name)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize('name', METHODS)
def test_model_state_kept(name):
    "Train mode, a frozen block, a module in another mode than its parent, gradients already in `.grad`: all as they were"
    model = _small()
    model.conv1.requires_grad_(False)
    model.bn2.eval()
    x = _x()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    before = model_state(model)
    m = _run(model, x, name)
    assert m.shape == (2, 16, 16) and torch.isfinite(m).all()
    assert_same_state(before, model_state(model))
    # and after an exception raised inside the model's forward pass
    def boom(mod, i, o): raise RuntimeError('boom')
    h = model.conv4.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match='boom'): _run(model, x, name)
    h.remove()
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize('name', METHODS)
def test_grad_modes_frozen_channels_last(name):
    "The same maps under no_grad, inference_mode (and an inference tensor), fully frozen, and in channels_last"
    model = _small().eval()
    x = _x()
    ref = _run(model, x, name)
    with torch.no_grad():
        torch.testing.assert_close(_run(model, x, name), ref)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        torch.testing.assert_close(_run(model, x, name), ref)
        xi = _x()
    torch.testing.assert_close(_run(model, xi, name), ref)
    model.requires_grad_(False)
    torch.testing.assert_close(_run(model, x, name), ref)
    model.requires_grad_(True)
    cl = _small().eval().to(memory_format=torch.channels_last)
    # channels_last convolutions round differently (~1e-7); Kernel SHAP solves a weighted least squares over a few coalitions, whose
    # condition number carries that to ~1e-3 of the map (seen: 4 of 512 values 1.9e-4 apart); a layout bug would move whole maps
    tol = dict(rtol=1e-2, atol=1e-3) if name == 'kernelshap' else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_run(cl, x.to(memory_format=torch.channels_last), name), ref, **tol)


@pytest.mark.parametrize('name', METHODS)
def test_cpu_bfloat16_autocast(name):
    "Under CPU bfloat16 autocast, and on a bfloat16 model: float32 maps, close to the float32 ones (low precision moves them a little)"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = _run(model, x, name)
    with torch.autocast('cpu', dtype=torch.bfloat16): m = _run(model, x, name)
    assert m.dtype == torch.float32 and m.shape == ref.shape and torch.isfinite(m).all()
    assert (m - ref).abs().mean() < 0.12, (m - ref).abs().mean()
    before = model_state(model)
    mb = torchvision.models.resnet18(num_classes=4)
    mb.load_state_dict(model.state_dict())
    mb = mb.to(torch.bfloat16).eval()
    m = _run(mb, x, name)
    assert m.dtype == torch.float32 and (m - ref).abs().mean() < 0.12
    assert_same_state(before, model_state(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('name', METHODS)
def test_cuda(name):
    "On the GPU: computed there (also from a CPU batch, returned on the CPU), in float16 autocast too, close to the CPU maps"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = _run(model, x, name)
    gpu = torchvision.models.resnet18(num_classes=4)
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda().eval()
    before = model_state(gpu)
    m = _run(gpu, x.cuda(), name)
    assert m.device.type == 'cuda' and (m.cpu() - ref).abs().mean() < 1e-3
    assert _run(gpu, x, name).device == x.device
    with torch.autocast('cuda', dtype=torch.float16): assert (_run(gpu, x.cuda(), name).cpu() - ref).abs().mean() < 0.12
    assert_same_state(before, model_state(gpu))


def _shifted(monkeypatch, n_classes):
    "Context.score and Context.pick made to read class t + 1 (mod n) where the engine asks for class t"
    from fastai_heatmap.core import Context
    score, pick = Context.score, Context.pick
    def shift(ctx, f, *args):
        t = ctx.targets
        ctx.targets = (t + 1) % n_classes
        try: return f(ctx, *args)
        finally: ctx.targets = t
    monkeypatch.setattr(Context, 'score', lambda self, *a: shift(self, score, *a))
    monkeypatch.setattr(Context, 'pick', lambda self, *a: shift(self, pick, *a))


LASSO = dict(lime=dict(alpha=1e-5)) # the default L1 penalty (0.01) zeroes every feature of models this small

def _sensitive():
    "The small model with its last layer scaled up, so that its probabilities move when the input does (LIME's Lasso keeps features)"
    m = _small().eval()
    with torch.no_grad(): m.fc.weight.mul_(30); m.fc.bias.mul_(30)
    return m


@pytest.mark.parametrize('name', METHODS) # CAM too: it weighs the head's rows by `ctx.output_grads`, the score's gradient
def test_scores_read_only_through_the_context(name, monkeypatch):
    """A method reads the score it explains only through `Context.score` (what gradients differentiate) and `Context.probs` /
    `pick` / `prob` (what perturbations evaluate), never by indexing the model's output by class itself: with those made to
    read another class, every map is that class's map. (So that segmentation, regression and `score=` work for every method.)"""
    model, x = _sensitive(), _x()
    t = torch.tensor([0, 2])
    kw = LASSO.get(name, {})
    ref = _run(model, x, name, targets=(t + 1) % 4, norm=None, **kw)
    _shifted(monkeypatch, 4)
    torch.testing.assert_close(_run(model, x, name, targets=t, norm=None, **kw), ref)


ATTRIBUTION = [n for n in METHODS if n in ('integrated_gradients', 'deeplift', 'deepliftshap', 'gradientshap', 'lrp', 'feature_ablation', 'lime', 'kernelshap', 'dff')]

def test_attribution_maps_depend_on_the_class():
    "The test above is not vacuous for the attribution family: each one's maps of classes 1 and 3 differ"
    model, x = _sensitive(), _x()
    assert len(ATTRIBUTION) == 9
    for name in ATTRIBUTION:
        a, b = (_run(model, x, name, targets=t, norm=None, **LASSO.get(name, {})) for t in ([1, 3], [3, 1]))
        assert (a - b).abs().max() > 0.1 * a.abs().max() > 0, name
