"""The engine `heatmap`/`explain` on real architectures: the model matrix, per-example vs batched, the papers'
identities, hand-computed values, the model's state (also after errors), bad input, dtypes and grad modes."""
import pytest, torch, torchvision
import torch.nn.functional as F
from torch import nn
from fastai.vision.all import create_vision_model, resnet18, xresnet18
from fastai_heatmap.core import heatmap, explain, default_layer, resolve_layer, method_names
from conftest import model_state, assert_same_state

N_OUT = 5


def _randomize_bn_stats(model, seed=0):
    "Non-trivial running statistics and affine parameters, so that folding a BatchNorm is really tested"
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def build(name):
    "(model, the layer before the pooling, whether CAM applies) for each architecture of the matrix"
    torch.manual_seed(0)
    if name == 'fastai_default':    m, layer, cam = create_vision_model(resnet18, N_OUT, pretrained=False), '0', False
    elif name == 'fastai_avg_linear': m, layer, cam = create_vision_model(resnet18, N_OUT, pretrained=False, concat_pool=False, lin_ftrs=[]), '0', True
    elif name == 'xresnet18':       m, layer, cam = create_vision_model(xresnet18, N_OUT, pretrained=False), '0', False
    elif name == 'torchvision':     m, layer, cam = torchvision.models.resnet18(num_classes=N_OUT), 'layer4', True
    return _randomize_bn_stats(m), layer, cam


MODELS = ['fastai_default', 'fastai_avg_linear', 'xresnet18', 'torchvision']


@pytest.fixture(scope='module')
def models(): return {n: build(n) for n in MODELS}


def _x(bs, size=64, seed=1): return torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('bs', [1, 3])
@pytest.mark.parametrize('method', ['gradcam', 'cam'])
@pytest.mark.parametrize('name', MODELS)
def test_matrix(models, name, method, bs):
    model, layer, cam_ok = models[name]
    x = _x(bs)
    before = model_state(model)
    if method == 'cam' and not cam_ok:
        with pytest.raises(ValueError, match="Use method='gradcam'"): heatmap(model, x, method=method, layer=layer)
        with pytest.raises(ValueError, match="Use method='gradcam'"): heatmap(model, x, method=method)  # its default layer: the one before the pooling
        assert_same_state(before, model_state(model))
        return
    e = explain(model, x, method=method, layer=layer, norm=None)
    assert_same_state(before, model_state(model))
    assert e.maps.shape == (bs, 64, 64) and e.maps.dtype == torch.float32 and not e.maps.requires_grad
    assert torch.isfinite(e.maps).all() and (e.maps >= 0).all()
    model.eval()
    with torch.no_grad(): ref = model(x)
    model.train()
    torch.testing.assert_close(e.preds, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(e.targets, ref.argmax(1))
    assert e.maps.flatten(1).amax(1).gt(0).any(), "an all-zero batch of maps says nothing"
    # per-example equals batched
    for i in range(bs):
        one = heatmap(model, x[i:i+1], method=method, layer=layer, norm=None)
        torch.testing.assert_close(one[0], e.maps[i], rtol=1e-4, atol=1e-5 * (1 + e.maps[i].abs().max().item()))
    # normalized maps
    m = heatmap(model, x, method=method, layer=layer)
    assert m.min() >= 0 and m.max() <= 1
    assert torch.allclose(m.flatten(1).amax(1), torch.ones(bs)) or (e.maps.flatten(1).amax(1) == 0).any()


@pytest.mark.parametrize('name', ['fastai_avg_linear', 'torchvision'])
def test_gradcam_proportional_to_cam(models, name):
    "On a global-average-pooling → [BatchNorm1d] → Linear head, ∂y_c/∂A_k(i,j) = w'_{c,k}/(hw): Grad-CAM = CAM/(hw)"
    model, layer, _ = models[name]
    x, t = _x(3), [0, 3, 4]
    kw = dict(targets=t, layer=layer, upsample=False, norm=None, relu=False)
    g, c = explain(model, x, method='gradcam', **kw), explain(model, x, method='cam', **kw)
    h, w = g.layer_size
    torch.testing.assert_close(g.maps * h * w, c.maps, rtol=1e-4, atol=1e-5 * c.maps.abs().max().item())
    # and CAM's spatial mean is the logit up to a constant of the class (its bias, and the folded BatchNorm's shift)
    c3 = explain(model, x, method='cam', **{**kw, 'targets': 3})
    assert (c3.maps.mean((1, 2)) - c3.preds[:, 3]).std() < 1e-4 * c3.preds.abs().max()


def tiny_model():
    "One 2×2 convolution with fixed weights, average pooling, and a fixed Linear: small enough to compute by hand"
    conv = nn.Conv2d(1, 2, 2, bias=False)
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1., 1.], [1., 1.]]], [[[1., 0.], [0., -1.]]]]))
        lin.weight.copy_(torch.tensor([[1., 2.], [-1., .5]]))
    return nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)


def test_hand_computed():
    """x = [[0,1,2],[3,4,5],[6,7,8]]. A_0 = 2×2 window sums = [[8,12],[20,24]]; A_1 = x[i,j]-x[i+1,j+1] = -4 everywhere.
    Pooled (16, -4) → logits y_0 = 16-8 = 8, y_1 = -16-2 = -18: the prediction is class 0.
    Grad-CAM, class 0: α = W_0/4 = (.25, .5) → .25·A_0 + .5·A_1 = [[0,1],[3,4]].
    Grad-CAM, class 1: α = (-.25, .125) → [[-2.5,-3.5],[-5.5,-6.5]], all zero after ReLU.
    CAM, class 0: A_0 + 2·A_1 = [[0,4],[12,16]] = 4 × Grad-CAM (hw = 4).
    Bilinear upsampling to 3×3 (align_corners=False): output pixel i samples input (i+.5)·2/3-.5 = -1/6, 1/2, 7/6
    (clamped to 0, .5, 1), so [[0,1],[3,4]] → [[0,.5,1],[1.5,2,2.5],[3,3.5,4]]."""
    model = tiny_model()
    x = torch.arange(9.).view(1, 1, 3, 3)
    raw = dict(upsample=False, norm=None)
    e = explain(model, x, **raw)
    assert e.targets.tolist() == [0] and e.preds.tolist() == [[8., -18.]] and e.layer == '0'
    torch.testing.assert_close(e.maps[0], torch.tensor([[0., 1.], [3., 4.]]))
    torch.testing.assert_close(heatmap(model, x, targets=1, relu=False, **raw)[0], torch.tensor([[-2.5, -3.5], [-5.5, -6.5]]))
    torch.testing.assert_close(heatmap(model, x, targets=1, **raw)[0], torch.zeros(2, 2))
    torch.testing.assert_close(heatmap(model, x, method='cam', **raw)[0], torch.tensor([[0., 4.], [12., 16.]]))
    torch.testing.assert_close(heatmap(model, x, norm=None)[0], torch.tensor([[0., .5, 1.], [1.5, 2., 2.5], [3., 3.5, 4.]]))
    torch.testing.assert_close(heatmap(model, x)[0], torch.tensor([[0., .5, 1.], [1.5, 2., 2.5], [3., 3.5, 4.]]) / 4)
    # a map with nothing in it is zeros, not NaN
    assert torch.equal(heatmap(model, x, targets=1)[0], torch.zeros(3, 3))
    # 'batch' normalization: one scale for the batch
    xb = torch.stack([x[0], x[0] * 2])
    b = heatmap(model, xb, targets=0, upsample=False, norm='batch')
    torch.testing.assert_close(b, torch.stack([torch.tensor([[0., 1.], [3., 4.]]), torch.tensor([[0., 2.], [6., 8.]])]) / 8)


def test_default_layers(models):
    "The last layer whose maps are at least 4×4 (the body, for 224-pixel images), never an adaptive pooling; remembered per model and size"
    x, big = _x(1), _x(1, 224)
    assert default_layer(models['fastai_default'][0], x) == '0.6'  # the body is 2×2 at 64 pixels
    assert default_layer(models['fastai_default'][0], big) == '0'
    assert default_layer(models['torchvision'][0], x) == 'layer3'
    assert default_layer(models['torchvision'][0], big) == 'layer4'
    bare = xresnet18(n_out=3)
    assert default_layer(bare, x) == '6' and default_layer(bare, big) == '7'  # a bare xresnet: its last block(s), not the 1×1 pooling
    assert default_layer(bare, x, min_size=1) == '7'
    vgg = torchvision.models.vgg11(num_classes=3)
    assert default_layer(vgg, _x(1, 224)) == 'features'  # 7×7; `avgpool` (adaptive) is never picked
    assert explain(vgg, torch.randn(1, 3, 96, 160)).layer_size == (6, 10)  # not the 3×5 map stretched to 7×7 by `avgpool`
    calls = []
    h = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(m))
    try:
        explain(vgg, torch.randn(1, 3, 96, 160))
        assert len(calls) <= len(list(vgg.modules()))  # one forward, not a second fully-hooked one to find the layer again
    finally: h.remove()
    tv = models['torchvision'][0]
    assert resolve_layer(tv, tv.layer3)[1] == 'layer3'
    assert explain(tv, x, layer='layer3.1.conv2').layer_size == (4, 4)


def test_targets(models):
    model, layer, _ = models['torchvision']
    x = _x(3)
    kw = dict(layer=layer, norm=None)
    torch.testing.assert_close(heatmap(model, x, targets=2, **kw), heatmap(model, x, targets=[2, 2, 2], **kw))
    torch.testing.assert_close(heatmap(model, x, targets=torch.tensor([0, 1, 2]), **kw), heatmap(model, x, targets=[0, 1, 2], **kw))
    per = torch.stack([heatmap(model, x[i:i+1], targets=t, **kw)[0] for i, t in enumerate([4, 0, 2])])
    torch.testing.assert_close(heatmap(model, x, targets=[4, 0, 2], **kw), per, rtol=1e-4, atol=1e-6)


class Boom(nn.Module):
    def forward(self, x): raise RuntimeError('boom inside the model')


class TupleOut(nn.Module):
    def __init__(self): super().__init__(); self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
    def forward(self, x): f = self.conv(x); return self.fc(f.mean((2, 3))), f


@pytest.mark.parametrize('method', ['gradcam', 'cam'])
def test_state_kept_and_errors_clear(models, method):
    "Each bad input is one clear exception, and leaves the model exactly as it was (flags, requires_grad, .grad, hooks)"
    model, layer, _ = models['fastai_default']
    x = _x(2)
    model[0].requires_grad_(False)  # frozen body, as after `learn.freeze()`
    model[0][1].eval()              # a module in another mode than its parent
    model(x).sum().backward()       # parameters with a populated .grad
    before = model_state(model)
    bad = [
        (dict(method='scorecamm'), ValueError, "Unknown method 'scorecamm'. Did you mean 'scorecam'"),
        (dict(layer='0.99'), ValueError, 'no layer named'),
        (dict(layer='1.2'), ValueError, 'not a spatial'),
        (dict(targets=-1), IndexError, 'out of range'),
        (dict(targets=1.7), TypeError, 'float'),
        (dict(window=3), TypeError, "takes no option 'window'"),
        (dict(targets=N_OUT), IndexError, 'out of range'),
        (dict(targets=[0, 1, 2]), ValueError, 'one class per sample'),
        (dict(targets='cat'), TypeError, 'learn.heatmap'),
        (dict(norm='minmax'), ValueError, 'Unknown norm'),
    ]
    if method == 'cam': bad.append((dict(), ValueError, "Use method='gradcam'"))
    else: bad.append((dict(x=x[:, :1]), ValueError, '3-channel images, but this batch has 1'))
    for kw, exc, msg in bad:
        xx = kw.pop('x', x)
        with pytest.raises(exc, match=msg): heatmap(model, xx, **{'method': method, **kw})
        assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match=r'xb\[None\]'): heatmap(model, x[0], method=method)
    with pytest.raises(TypeError, match='float batch'): heatmap(model, x.long(), method=method)
    with pytest.raises(TypeError, match='float batch'): heatmap(model, torch.randn(2, 10), method=method)
    assert_same_state(before, model_state(model))
    if method == 'gradcam': heatmap(model, x)  # and it works on this frozen, mixed-mode model
    assert_same_state(before, model_state(model))


def test_exception_inside_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), Boom(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    before = model_state(model)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match='boom'): heatmap(model, _x(2), layer='0')
        assert not torch.is_grad_enabled()  # the caller's mode survives the hook that switched recording on
    assert torch.is_grad_enabled()
    assert_same_state(before, model_state(model))
    with pytest.raises(TypeError, match='returned a tuple'): heatmap(TupleOut(), _x(2), layer='conv')


def test_grad_modes_and_frozen(models):
    model, layer, _ = models['torchvision']
    x = _x(2)
    ref = heatmap(model, x, layer=layer)
    with torch.no_grad(): torch.testing.assert_close(heatmap(model, x, layer=layer), ref)
    with torch.inference_mode(): torch.testing.assert_close(heatmap(model, x, layer=layer), ref)
    with torch.inference_mode(): xi = _x(2)
    torch.testing.assert_close(heatmap(model, xi, layer=layer), ref)  # an inference tensor as input
    model.requires_grad_(False)
    try: torch.testing.assert_close(heatmap(model, x, layer=layer), ref)
    finally: model.requires_grad_(True)


def _close_maps(a, b, tol):
    "Normalized maps agree up to `tol` on average (low precision changes the values a little)"
    assert (a - b).abs().mean() < tol, (a - b).abs().mean()


@pytest.mark.parametrize('method', ['gradcam', 'cam'])
def test_bfloat16_and_autocast(models, method):
    model, layer, _ = models['torchvision']
    x = _x(3)
    ref = heatmap(model, x, method=method, layer=layer)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        m = heatmap(model, x, method=method, layer=layer)
    assert m.dtype == torch.float32
    _close_maps(m, ref, 0.05)
    mb = torchvision.models.resnet18(num_classes=N_OUT)
    mb.load_state_dict(model.state_dict())
    mb = mb.to(torch.bfloat16)
    before = model_state(mb)
    m = heatmap(mb, x, method=method, layer=layer)  # a float32 batch is cast to the model's dtype
    assert m.dtype == torch.float32 and m.device == x.device
    _close_maps(m, ref, 0.05)
    assert_same_state(before, model_state(mb))


def test_half_on_cpu(models):
    model, layer, _ = models['torchvision']
    mh = torchvision.models.resnet18(num_classes=N_OUT)
    mh.load_state_dict(model.state_dict())
    mh = mh.half().eval()
    x = _x(2)
    try:
        with torch.no_grad(): mh(x.half())
    except RuntimeError as e: pytest.skip(f'float16 convolutions are not supported on this CPU build: {e}')
    _close_maps(heatmap(mh, x, layer=layer), heatmap(model, x, layer=layer), 0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('method', ['gradcam', 'cam'])
def test_cuda(models, method):
    model, layer, _ = models['torchvision']
    x = _x(4)
    ref = heatmap(model, x, method=method, layer=layer)
    mc = torchvision.models.resnet18(num_classes=N_OUT)
    mc.load_state_dict(model.state_dict())
    mc = mc.cuda()
    before = model_state(mc)
    m = heatmap(mc, x.cuda(), method=method, layer=layer)
    assert m.device.type == 'cuda'
    _close_maps(m.cpu(), ref, 1e-3)
    assert heatmap(mc, x, method=method, layer=layer).device == x.device  # a CPU batch: computed on the GPU, returned on the CPU
    with torch.autocast('cuda', dtype=torch.float16): _close_maps(heatmap(mc, x.cuda(), method=method, layer=layer).cpu(), ref, 0.05)
    assert_same_state(before, model_state(mc))
