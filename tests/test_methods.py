"""Every registered method on real architectures (torchvision, fastai, timm CNNs): shapes, dtypes, per-example equals
batched, several targets from one pass, and the identities between methods. The method list comes from the registry:
a new method is covered here without new test code."""
import warnings
import pytest, torch, torchvision
from torch import nn
from fastai.vision.all import create_vision_model, resnet18
from fastai_heatmap.core import heatmap, explain, method_names, get_method, list_methods
from conftest import fast_options

timm = pytest.importorskip('timm')
N_OUT, SIZE = 5, 64


def _arch(name):
    torch.manual_seed(0)
    if name == 'torchvision_resnet18': return torchvision.models.resnet18(num_classes=N_OUT)
    if name == 'fastai_resnet18': return create_vision_model(resnet18, N_OUT, pretrained=False)
    if name == 'timm_resnet18': return timm.create_model('resnet18', pretrained=False, num_classes=N_OUT)
    if name == 'timm_convnext': return _with_biases(timm.create_model('convnext_atto', pretrained=False, num_classes=N_OUT))
    raise ValueError(name)


def _with_biases(model, std=0.1):
    """Nonzero convolution biases, as trained networks have. timm starts them at 0: then a masked (zeroed) region of the input
    reaches ConvNeXt's stem LayerNorm as a zero vector, where it divides by √eps = 1e-3, and the network's outputs on Score-CAM's
    masked inputs change by ~1e4× any rounding of the masks (test_convnext_conditioning): per-example and batched maps then differ
    by that network's conditioning, not by the method's"""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            with torch.no_grad(): m.bias.copy_(std * torch.randn(m.bias.shape, generator=g))
    return model

ARCHS = ['torchvision_resnet18', 'fastai_resnet18', 'timm_resnet18', 'timm_convnext']


@pytest.fixture(scope='module')
def archs(): return {n: _arch(n).eval() for n in ARCHS}


@pytest.fixture(scope='module')
def xb(): return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _maps(model, x, name, **kw):
    "The method's maps, or None where it does not apply to this model (CAM on a head that is not pooling → Linear)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # guided backprop on a model without ReLU (ConvNeXt uses GELU) says so
            return explain(model, x, method=name, **{**fast_options(name), **kw})
    except ValueError as e:
        assert name == 'cam' and "Use method='gradcam'" in str(e), str(e)
        return None


def test_registry_table():
    df = list_methods()
    assert list(df.columns) == ['name', 'family', 'paper', 'cost', 'options']
    assert set(df.name) == set(method_names()) and len(df) >= 17
    assert set(df.family) == {'cam', 'gradient', 'perturbation'}
    assert df.paper.str.len().min() > 0 and df.cost.str.len().min() > 0
    for n in df.name: assert get_method(n).name == n and get_method(n.upper().replace('_', '-')).name == n
    assert get_method('Grad-CAM++').name == get_method('gradcampp').name == get_method('GradCAMpp').name == 'gradcam++'
    assert get_method(type(get_method('xgradcam'))).name == 'xgradcam'  # a class is accepted too


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('name', method_names())
def test_every_method_every_arch(archs, xb, arch, name):
    model = archs[arch]
    e = _maps(model, xb, name, norm=None)
    if e is None: return
    assert e.maps.shape == (2, SIZE, SIZE) and e.maps.dtype == torch.float32 and not e.maps.requires_grad
    assert torch.isfinite(e.maps).all() and (e.maps >= 0).all()
    assert e.method == name and torch.equal(e.targets, e.preds.argmax(1))
    if get_method(name).uses_layer: assert e.layer is not None and min(e.layer_size) >= 1
    else: assert e.layer is None and e.layer_size == (SIZE, SIZE)
    # per example equals batched (Ablation-CAM's weights are differences of nearly equal scores, so float32 rounding shows more;
    # LRP divides by each layer's outputs, which a random ConvNeXt's layer norms bring near 0 at places: its relevances reach 1e6
    # times their median there, and batch-size rounding shows at a few pixels, up to 2%; Smooth Grad-CAM++ as torch-cam computes it divides
    # by 2E[g²] + Σ_ab E[g³]A, whose two terms nearly cancel at places in a random network: the activations' batch-size rounding, 1e-6,
    # moves a channel's weight by 1e-3 there)
    tol, rtol = {'ablationcam': (1e-3, 1e-4), 'lrp': (1e-3, 2e-2), 'smoothgradcam++': (1e-3, 1e-3)}.get(name, (1e-5, 1e-4))
    for i in range(2):
        one = _maps(model, xb[i:i+1], name, norm=None).maps[0]
        torch.testing.assert_close(one, e.maps[i], rtol=rtol, atol=tol * (1 + e.maps[i].abs().max().item()))


@pytest.mark.parametrize('name', method_names())
def test_several_targets_from_one_pass(archs, name):
    "(B, T) targets: each column equals the map of that class alone"
    model, xb = archs['torchvision_resnet18'], torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    e = _maps(model, xb, name, targets=[[0, 3], [4, 1]], norm=None)
    assert e.maps.shape == (2, 2, 32, 32)
    for j, col in enumerate(([0, 4], [3, 1])):
        torch.testing.assert_close(e.maps[:, j], _maps(model, xb, name, targets=col, norm=None).maps, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', method_names())
def test_signed_maps(archs, name):
    "`relu=False` gives the signed map; `relu=True` its positive part (its magnitude, for input gradients), compared before upsampling"
    model, xb = archs['timm_resnet18'], torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    s, p = _maps(model, xb, name, relu=False, norm=None, upsample=False), _maps(model, xb, name, norm=None, upsample=False)
    if s is None: return
    ref = s.maps.abs() if get_method(name).map_rule == 'abs' else s.maps.relu()
    torch.testing.assert_close(p.maps, ref, rtol=1e-4, atol=1e-6)


def test_class_agnostic_and_class_specific(archs, xb):
    "Eigen-CAM does not depend on the class; Grad-CAM and the others do"
    model = archs['torchvision_resnet18']
    torch.testing.assert_close(heatmap(model, xb, targets=0, method='eigencam'), heatmap(model, xb, targets=3, method='eigencam'))
    for name in ('gradcam', 'scorecam', 'saliency', 'occlusion'):
        a, b = (heatmap(model, xb, targets=t, method=name, **fast_options(name)) for t in (0, 3))
        assert not torch.allclose(a, b)


def test_smoothgrad(archs, xb):
    "SmoothGrad is the mean of the raw maps of noisy copies, σ = noise × the input's range; deterministic; any gradient method"
    model = archs['torchvision_resnet18']
    a = heatmap(model, xb, method='saliency', smooth=6, noise=0.1, norm=None)
    torch.testing.assert_close(a, heatmap(model, xb, method='saliency', smooth=6, noise=0.1, norm=None, batch_size=5))
    assert not torch.allclose(a, heatmap(model, xb, method='saliency', norm=None))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((6, 3, SIZE, SIZE), generator=g)
    rng = xb.flatten(1).amax(1) - xb.flatten(1).amin(1)
    ref = torch.stack([heatmap(model, xb + 0.1 * rng[:, None, None, None] * eps[k], method='saliency', norm=None, reduce=None, relu=False) for k in range(6)]).mean(0)
    torch.testing.assert_close(heatmap(model, xb, method='saliency', smooth=6, noise=0.1, norm=None, reduce=None, relu=False), ref, rtol=1e-4, atol=1e-7)
    for name in ('gradcam', 'gradcam++', 'input_x_gradient', 'guided'):
        assert heatmap(model, xb, method=name, smooth=3).shape == (2, SIZE, SIZE)
    small = xb[:1, :, :32, :32]
    ss = heatmap(model, small, method='scorecam', smooth=2)  # SS-CAM: noisy masks
    assert ss.shape == (1, 32, 32) and not torch.allclose(ss, heatmap(model, small, method='scorecam'))


def _sensitivity(model, x):
    "How much the probabilities move per unit change of an input that is half masked to 0, as Score-CAM's and occlusion's are"
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(8, 1, *x.shape[-2:], generator=g)
    mask[..., :x.shape[-2] // 2, :] = 0
    xm = x[:1] * mask
    d = 1e-6 * torch.randn(xm.shape, generator=g)
    with torch.no_grad(): return ((model(xm).softmax(-1) - model(xm + d).softmax(-1)).abs().max() / d.abs().max()).item()


def test_convnext_conditioning(xb):
    """The conditioning behind Score-CAM's per-example vs batched differences on a ConvNeXt with timm's zero biases, on its own:
    at masked inputs that network amplifies input changes by > 1e3 (rounding of 1e-6 in a mask moves a probability by 1e-2),
    while with nonzero biases (the one of the matrix above) it does not, and there the maps agree to 1e-5"""
    torch.manual_seed(0)
    zero = timm.create_model('convnext_atto', pretrained=False, num_classes=N_OUT).eval()
    assert _sensitivity(zero, xb) > 1e3
    assert _sensitivity(_arch('timm_convnext').eval(), xb) < 10


def test_eigencam_sign_after_a_layernorm(xb):
    """After ConvNeXt's LayerNorm over channels the mean over channels is 0 at every position, so a sign that follows it would be
    rounding noise (it flipped sample 0's map between the batch and the sample alone); the first component itself is well
    conditioned there (σ1/σ2 ≈ 1.05), and per-example equals batched"""
    torch.manual_seed(0)
    model = timm.create_model('convnext_atto', pretrained=False, num_classes=N_OUT).eval()  # timm's own initialization
    e = explain(model, xb, method='eigencam', norm=None)
    assert 'downsample.0' in e.layer  # a LayerNorm2d
    for i in range(len(xb)):
        torch.testing.assert_close(explain(model, xb[i:i+1], method='eigencam', norm=None).maps[0], e.maps[i], rtol=1e-4, atol=1e-5 * (1 + e.maps[i].abs().max().item()))


def test_hirescam_equals_gradcam_with_constant_gradient():
    "Where the gradient is the same at every position (a pooling → Linear head), HiResCAM = Grad-CAM = CAM/(hw)"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=N_OUT).eval()
    x = torch.randn(3, 3, 96, 96)
    kw = dict(layer='layer4', upsample=False, norm=None, relu=False, targets=[0, 2, 4])
    g = heatmap(model, x, method='gradcam', **kw)
    torch.testing.assert_close(heatmap(model, x, method='hirescam', **kw), g, rtol=1e-4, atol=1e-6 * g.abs().max().item())
    torch.testing.assert_close(heatmap(model, x, method='cam', **kw), g * 9, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_scorecam_and_ablationcam_skip_dead_channels():
    "A channel that is 0 everywhere adds nothing to the map: it gets no forward pass"
    from fastai_heatmap.hooks import ActivationHook
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=N_OUT).eval()
    x = torch.randn(2, 3, 64, 64)
    with ActivationHook(model.layer4) as h:
        with torch.no_grad(): model(x)
    alive = int(h.stored.flatten(2).ne(0).any(2).sum())
    assert 0 < alive < 2 * 512
    calls = []
    handle = model.register_forward_pre_hook(lambda m, i: calls.append(len(i[0])))
    try: heatmap(model, x, method='scorecam', layer='layer4', batch_size=10000)
    finally: handle.remove()
    assert sum(calls) == len(x) + alive  # the forward for the predictions, then one masked input per live (sample, channel)
    from fastai_heatmap.core import Context
    rows = []
    orig = Context.run_with_layer
    def spy(self, r, a): rows.append(len(r)); return orig(self, r, a)
    Context.run_with_layer = spy
    try: heatmap(model, x, method='ablationcam', layer='layer4', batch_size=10000)
    finally: Context.run_with_layer = orig
    assert sum(rows) == alive  # one ablated copy per live (sample, channel)
