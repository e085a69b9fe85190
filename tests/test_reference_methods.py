"""Every method against an independent implementation that follows the same paper, on two architectures (a torchvision
resnet18 and a vgg11, random weights), with one *different* class per sample so that a mix-up of targets would show.

- pytorch-grad-cam 1.5: XGrad-CAM, LayerCAM, HiResCAM, Ablation-CAM, Eigen-CAM and Eigen-Grad-CAM (raw maps, through its
  `get_cam_image`, and its full-size normalized output); Grad-CAM++ too, on a model whose scores are large enough that its
  `eps = 1e-6` in the denominator of α does not matter (with small gradients, g² is below that eps and it drifts from
  the formula). Its Score-CAM applies the softmax across channels to the raw scores; the paper and the authors' code
  apply it across classes (our choice): replacing that one step in ours gives pytorch-grad-cam's maps exactly.
- captum 0.9: saliency, input × gradient, guided backpropagation, the deconvnet rule, Guided Grad-CAM (captum upsamples
  Grad-CAM with `nearest` by default; with `interpolate_mode='bilinear'` it is the paper's and ours), integrated
  gradients (`method='riemann_middle'`, the same rule as ours), occlusion (on the softmax of the outputs, with a
  window and stride that tile the image).
- torchcam 0.5: XGrad-CAM and LayerCAM (raw maps). Its Grad-CAM++ sums A·g³ per position instead of over the map (not the
  paper's equation 19) and its Score-CAM uses a channel softmax of score differences: not compared.
"""
import warnings
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastai_heatmap.core import heatmap, normalize_maps
from fastai_heatmap.cam import ScoreCAM
from conftest import close_to

tvm = pytest.importorskip('torchvision.models')
warnings.filterwarnings('ignore', category=UserWarning)


def _model(arch, seed=0, scale=1.):
    torch.manual_seed(seed)
    m = getattr(tvm, arch)(weights=None, num_classes=10).eval()
    last = m.fc if arch == 'resnet18' else m.classifier[-1]
    with torch.no_grad(): last.weight.mul_(scale); last.bias.mul_(scale)
    return m

LAYERS = dict(resnet18='layer4', vgg11='features')  # the last block / the features' output (vgg: after the last max pooling)
SIZE = dict(resnet18=96, vgg11=64)


def _pgc_layer(m, arch): return m.layer4[-1] if arch == 'resnet18' else m.features[-1]


@pytest.fixture(scope='module', params=['resnet18', 'vgg11'])
def setup(request):
    arch = request.param
    m = _model(arch)
    x = torch.randn(3, 3, SIZE[arch], SIZE[arch], generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): order = m(x).argsort(1, descending=True).tolist()
    tg = []
    for o in order: tg.append(next(c for c in o if c not in tg))
    return arch, m, x, tg


_close = close_to  # conftest's


# ---------------------------------------------------------------------------------------------- pytorch-grad-cam
def _pgc(cls_name, arch, x, tg, scale=1.):
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    m = _model(arch, scale=scale)  # it calls model.eval() and fills .grad: a model of its own
    layer = _pgc_layer(m, arch)
    T = [ClassifierOutputTarget(c) for c in tg]
    with getattr(pgc, cls_name)(model=m, target_layers=[layer]) as cam:
        full = cam(input_tensor=x, targets=T)
        ag = cam.activations_and_grads
        acts = ag.activations[0].numpy()
        grads = ag.gradients[0].numpy() if ag.gradients else None
        raw = cam.get_cam_image(x, layer, T, acts, grads, False)
    return torch.from_numpy(full), torch.from_numpy(raw)


@pytest.mark.parametrize('name,cls', [('xgradcam', 'XGradCAM'), ('layercam', 'LayerCAM'), ('hirescam', 'HiResCAM'), ('ablationcam', 'AblationCAM'),
                                      ('eigencam', 'EigenCAM'), ('eigengradcam', 'EigenGradCAM'), ('gradcam++', 'GradCAMPlusPlus')])
def test_matches_pytorch_grad_cam(setup, name, cls):
    arch, m, x, tg = setup
    if arch == 'vgg11' and name == 'ablationcam': x, tg = x[:1], tg[:1]  # a forward pass per channel: one image is enough here
    scale = 1e3 if name == 'gradcam++' else 1.
    m = _model(arch, scale=scale) if scale != 1 else m
    full, raw = _pgc(cls, arch, x, tg, scale)
    layer = LAYERS[arch]
    ours_raw = heatmap(m, x, targets=tg, method=name, layer=layer, upsample=False, norm=None, relu=False)
    if name.startswith('eigen'):  # an eigenvector's sign is arbitrary: pytorch-grad-cam does not fix it, we do
        ours_raw = ours_raw * torch.sign((ours_raw * raw).flatten(1).sum(1))[:, None, None]
    _close(ours_raw, raw, rtol=1e-4 if name in ('ablationcam', 'gradcam++') else 1e-5)
    if not name.startswith('eigen'):  # its full-size maps: ReLU, min-max per map, cv2 bilinear resize (half-pixel centres)
        ours = heatmap(m, x, targets=tg, method=name, layer=layer)
        assert (ours - full).abs().max() < 1e-3


def test_scorecam_differs_from_pytorch_grad_cam_by_the_softmax_only(setup):
    "pytorch-grad-cam's Score-CAM is ours with two steps changed: a softmax across channels of the raw scores (not across classes), and masks upsampled with align_corners=True"
    arch, m, x, tg = setup
    x, tg = x[:1], tg[:1]  # a forward pass per channel, three times (theirs, ours, the variant): one image is enough
    full, raw = _pgc('ScoreCAM', arch, x, tg)
    class ChannelSoftmax(ScoreCAM):
        "pytorch-grad-cam's variant: every channel scored (dead ones too, on an input masked to 0), raw scores, softmax across channels, corner-aligned masks"
        def weights(self, ctx):
            masks = normalize_maps(F.interpolate(ctx.acts, size=ctx.x.shape[-2:], mode='bilinear', align_corners=True))
            n, K = ctx.acts.shape[:2]
            rows = torch.arange(n).repeat_interleave(K)
            return ctx.score(ctx.run(ctx.x[rows] * masks.flatten(0, 1)[:, None]), rows).view(n, K).softmax(1)
    ours = heatmap(m, x, targets=tg, method=ChannelSoftmax(), layer=LAYERS[arch], upsample=False, norm=None, relu=False)
    _close(ours, raw, rtol=1e-4)
    assert (heatmap(m, x, targets=tg, method='scorecam', layer=LAYERS[arch]) - full).abs().max() > 1e-2  # and ours is not theirs


# ---------------------------------------------------------------------------------------------- torchcam
@pytest.mark.parametrize('name,cls', [('xgradcam', 'XGradCAM'), ('layercam', 'LayerCAM')])
def test_matches_torchcam(setup, name, cls):
    methods = pytest.importorskip('torchcam.methods')
    arch, m, x, tg = setup
    mm = _model(arch)
    with getattr(methods, cls)(mm, LAYERS[arch], input_shape=tuple(x.shape[1:])) as ex:
        raw = ex(tg, mm(x), normalized=False)[0]
    _close(heatmap(m, x, targets=tg, method=name, layer=LAYERS[arch], upsample=False, norm=None), raw)


# ---------------------------------------------------------------------------------------------- captum
def _ours(m, x, tg, name, **kw): return heatmap(m, x, targets=tg, method=name, norm=None, relu=False, reduce=None, **kw)


@pytest.mark.parametrize('name,cls', [('saliency', 'Saliency'), ('input_x_gradient', 'InputXGradient'),
                                      ('guided', 'GuidedBackprop'), ('rectified', 'Deconvolution')])
def test_input_gradients_match_captum(setup, name, cls):
    attr = pytest.importorskip('captum.attr')
    arch, m, x, tg = setup
    kw = dict(abs=False) if name == 'saliency' else {}
    ref = getattr(attr, cls)(m).attribute(x.clone().requires_grad_(), target=torch.tensor(tg), **kw)
    _close(_ours(m, x, tg, name), ref)
    # and the map: the channel of largest magnitude, its magnitude with relu=True (captum's Saliency(abs=True) then max)
    if name == 'saliency':
        sal = attr.Saliency(m).attribute(x.clone().requires_grad_(), target=torch.tensor(tg)).amax(1)
        _close(heatmap(m, x, targets=tg, method='saliency', norm=None), sal)


def test_guided_gradcam_matches_captum(setup):
    attr = pytest.importorskip('captum.attr')
    arch, m, x, tg = setup
    layer = m.get_submodule(LAYERS[arch])
    ref = attr.GuidedGradCam(m, layer).attribute(x.clone().requires_grad_(), target=torch.tensor(tg), interpolate_mode='bilinear')
    _close(_ours(m, x, tg, 'guided_gradcam', layer=LAYERS[arch]), ref)


def test_integrated_gradients_match_captum(setup):
    attr = pytest.importorskip('captum.attr')
    arch, m, x, tg = setup
    ref = attr.IntegratedGradients(m).attribute(x, target=torch.tensor(tg), n_steps=16, method='riemann_middle')
    _close(_ours(m, x, tg, 'integrated_gradients', steps=16), ref, rtol=1e-4)
    base = torch.tensor([.5, -.2, .1]).view(3, 1, 1)
    ref = attr.IntegratedGradients(m).attribute(x, baselines=base.expand_as(x[0])[None].expand_as(x).contiguous(), target=torch.tensor(tg), n_steps=8, method='riemann_middle')
    _close(_ours(m, x, tg, 'integrated_gradients', steps=8, baseline=base), ref, rtol=1e-4)


def test_occlusion_matches_captum(setup):
    attr = pytest.importorskip('captum.attr')
    arch, m, x, tg = setup
    s = SIZE[arch] // 8
    probs = lambda inp: m(inp).softmax(-1)
    ref = attr.Occlusion(probs).attribute(x, sliding_window_shapes=(3, 2*s, 2*s), strides=(3, s, s), target=torch.tensor(tg), perturbations_per_eval=64)
    ours = heatmap(m, x, targets=tg, method='occlusion', window=2*s, stride=s, norm=None, relu=False)
    for c in range(3): _close(ours, ref[:, c])  # captum repeats the map over the channels the window covers


def test_guided_matches_pytorch_grad_cam(setup):
    "Guided backpropagation equals pytorch-grad-cam's GuidedBackpropReLUModel (which swaps nn.ReLU modules) on a ReLU network"
    import copy
    pgc = pytest.importorskip('pytorch_grad_cam')
    arch, m, x, tg = setup
    # one image per forward, as pytorch-grad-cam runs it: a batch of 3 may take other convolution kernels, whose rounding flips the
    # guided ReLU's gate where a pre-activation is within rounding of 0 (per-example = batched is tested with the other methods)
    ours = torch.cat([_ours(m, x[i:i+1], tg[i:i+1], 'guided') for i in range(len(x))])
    theirs = pgc.GuidedBackpropReLUModel(copy.deepcopy(m), device='cpu') # it swaps the model's modules: give it a copy
    ref = torch.stack([torch.from_numpy(theirs(x[i:i+1].clone(), target_category=c)).permute(2, 0, 1) for i, c in enumerate(tg)])
    _close(ours, ref)


# ---------------------------------------------------------------------------------------------- pytorch-grad-cam 1.5: the methods of issue 18
def _pgc_run(cls_name, m, layer, x, tg, **init):
    "pytorch-grad-cam's full-size maps and its raw maps (what `get_cam_image` returned during that call), on a model of its own"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with getattr(pgc, cls_name)(model=m, target_layers=[layer], **init) as cam:
        raw, get = [], cam.get_cam_image
        cam.get_cam_image = lambda *a, **k: raw.append(get(*a, **k)) or raw[-1]
        full = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in tg])
    return torch.from_numpy(full), torch.from_numpy(raw[0])


def _same_as_pgc(m, x, tg, name, full, raw, layer, rtol=1e-5, **kw):
    "Ours equals pytorch-grad-cam's raw maps (to `rtol` of their largest magnitude) and its full-size normalized maps (cv2's resize: to 1e-3)"
    _close(heatmap(m, x, targets=tg, method=name, layer=layer, upsample=False, norm=None, relu=False, **kw), raw, rtol=rtol)
    assert (heatmap(m, x, targets=tg, method=name, layer=layer, **kw) - full).abs().max() < 1e-3


def _smooth_head(arch):
    "The model with a GELU between two Linear layers in its head: the model after the layer is not piecewise linear, so ShapleyCAM's Hessian term is not 0"
    m = _model(arch)
    torch.manual_seed(2)
    if arch == 'resnet18': m.fc = nn.Sequential(nn.Linear(512, 64), nn.GELU(), nn.Linear(64, 10))
    else: m.classifier[-1] = nn.Sequential(nn.Linear(4096, 64), nn.GELU(), nn.Linear(64, 10))
    with torch.no_grad():
        for p in m.parameters(): p.mul_(1.5) if p.ndim == 2 and p.shape[0] in (64, 10) else None
    return m.eval()


@pytest.mark.parametrize('name,cls', [('gradcam_elementwise', 'GradCAMElementWise'), ('shapleycam', 'ShapleyCAM')])
@pytest.mark.parametrize('head', ['linear', 'gelu'])
def test_issue18_methods_match_pytorch_grad_cam(setup, name, cls, head):
    arch, m, x, tg = setup
    make = (lambda: _model(arch)) if head == 'linear' else (lambda: _smooth_head(arch))
    theirs = make()
    full, raw = _pgc_run(cls, theirs, _pgc_layer(theirs, arch), x, tg)
    ours = make()
    _same_as_pgc(ours, x, tg, name, full, raw, LAYERS[arch], rtol=1e-4)
    if name == 'shapleycam' and head == 'gelu':  # not vacuous: the Hessian term moves the map away from Grad-CAM's
        g = heatmap(ours, x, targets=tg, method='gradcam', layer=LAYERS[arch], upsample=False, norm=None, relu=False)
        assert (g - raw).abs().max() > 1e-3 * raw.abs().max()


def test_randomcam_matches_pytorch_grad_cam_with_the_same_weights(setup, monkeypatch):
    "pytorch-grad-cam's RandomCAM draws its weights with numpy: given ours, its maps are ours"
    import numpy as np
    from types import SimpleNamespace
    from fastai_heatmap.cam import RandomCAM
    arch, m, x, tg = setup
    K = dict(resnet18=512, vgg11=512)[arch]
    w = RandomCAM(seed=3).weights(SimpleNamespace(acts=torch.zeros(len(x), K, 1, 1)))
    monkeypatch.setattr(np.random, 'uniform', lambda lo, hi, size: w.double().numpy()[:, :size[1]] if (lo, hi) == (-1, 1) else None)
    theirs = _model(arch)
    full, raw = _pgc_run('RandomCAM', theirs, _pgc_layer(theirs, arch), x, tg)
    _same_as_pgc(m, x, tg, 'randomcam', full, raw, LAYERS[arch], seed=3)


@pytest.mark.parametrize('kernel,gamma', [('sigmoid', None), ('rbf', 1e-3), ('poly', None)])
def test_kpcacam_matches_pytorch_grad_cam(setup, kernel, gamma):
    "KPCA-CAM: scikit-learn's kernel PCA through pytorch-grad-cam, up to the sign (an eigenvector's is arbitrary; scikit-learn makes the largest entry positive, we follow the mean activation)"
    arch, m, x, tg = setup
    theirs = _model(arch)
    full, raw = _pgc_run('KPCA_CAM', theirs, _pgc_layer(theirs, arch), x, tg, kernel=kernel, gamma=gamma)
    ours = heatmap(m, x, targets=tg, method='kpcacam', kernel=kernel, gamma=gamma, layer=LAYERS[arch], upsample=False, norm=None, relu=False)
    _close(ours * torch.sign((ours * raw).flatten(1).sum(1))[:, None, None], raw, rtol=1e-4)


def test_finercam_matches_pytorch_grad_cam(setup):
    "Finer-CAM over Grad-CAM: pytorch-grad-cam picks the classes to compare with itself (`target_idx`, one call per sample)"
    import numpy as np
    pgc = pytest.importorskip('pytorch_grad_cam')
    arch, m, x, tg = setup
    theirs = _model(arch)
    for alpha in (1., .6):
        with pgc.FinerCAM(theirs, [_pgc_layer(theirs, arch)]) as cam:
            raw, get = [], cam.base_cam.get_cam_image
            cam.base_cam.get_cam_image = lambda *a, **k: raw.append(get(*a, **k)) or raw[-1]
            full = [torch.from_numpy(cam(x[i:i+1], alpha=alpha, target_idx=c)) for i, c in enumerate(tg)]
        _same_as_pgc(m, x, tg, 'finercam', torch.cat(full), torch.from_numpy(np.concatenate(raw)), LAYERS[arch], rtol=1e-4, alpha=alpha)
    g = heatmap(m, x, targets=tg, method='gradcam', layer=LAYERS[arch], upsample=False, norm=None)
    assert (heatmap(m, x, targets=tg, method='finercam', layer=LAYERS[arch], upsample=False, norm=None) - g).abs().max() > 1e-2 * g.abs().max()  # not Grad-CAM


# ---------------------------------------------------------------------------------------------- torchcam's Score-CAM family, Smooth Grad-CAM++; FullGrad
def _torchcam(cls, m, x, tg, layer=None, **init):
    "torchcam's raw maps (after its ReLU, before its normalization) for classes `tg`, its noise drawn from the global seed the engine's generator starts from (0)"
    methods = pytest.importorskip('torchcam.methods')
    layer = layer or LAYERS['resnet18' if hasattr(m, 'layer4') else 'vgg11']
    with getattr(methods, cls)(m, layer, input_shape=tuple(x.shape[1:]), **init) as ex:
        with torch.no_grad(): out = m(x)
        torch.manual_seed(0)
        return ex(tg, out, normalized=False)[0]


def _small(seed=0):
    "A small CNN (32 channels at the layer '7', 8×8 for a 32-pixel image; batch norms with running statistics): torch-cam's defaults (35 noisy copies, 10 steps) at a forward pass per channel and copy stay quick"
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for b in (m[1], m[5]): b.running_mean.normal_(0, .1); b.running_var.uniform_(.5, 2)
        m[-1].weight.mul_(30)  # logit changes of a few units: torch-cam's channel softmax far from uniform
    return m.eval()


@pytest.mark.parametrize('name,cls,init', [('sscam', 'SSCAM', {}), ('sscam', 'SSCAM', dict(num_samples=3, std=.5)), ('iscam', 'ISCAM', {}), ('iscam', 'ISCAM', dict(num_samples=3))])
def test_torchcam_score_family_matches_torchcam(name, cls, init):
    "SS-CAM and IS-CAM: torch-cam's numbers with the same noise (one image, torch-cam's defaults and others), raw and after the ReLU; not Score-CAM's (a softmax across classes)"
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for tg in ([3], [7]):
        raw = _torchcam(cls, _small(), x, tg, layer='7', **init)
        ours = heatmap(_small(), x, targets=tg, method=name, layer='7', upsample=False, norm=None, **init)
        _close(ours, raw, rtol=1e-4)
        assert (normalize_maps(ours) - normalize_maps(heatmap(_small(), x, targets=tg, method='scorecam', layer='7', upsample=False, norm=None))).abs().max() > 1e-2


def test_smoothgradcampp_matches_torchcam(setup):
    "Smooth Grad-CAM++: torch-cam's numbers with the same noise (one image), and not Grad-CAM++'s"
    arch, m, x, tg = setup
    x, tg = x[:1], tg[:1]
    mm = _model(arch, scale=1e3)  # scores large enough that torch-cam's eps = 1e-8 in α's denominator does not matter
    raw = _torchcam('SmoothGradCAMpp', mm, x, tg)
    ours = heatmap(_model(arch, scale=1e3), x, targets=tg, method='smoothgradcam++', layer=LAYERS[arch], upsample=False, norm=None)
    _close(ours, raw, rtol=1e-4)
    pp = heatmap(_model(arch, scale=1e3), x, targets=tg, method='gradcam++', layer=LAYERS[arch], upsample=False, norm=None)
    assert (normalize_maps(ours) - normalize_maps(pp)).abs().max() > 1e-2


def _biased(arch):
    "The model with nonzero biases: torchvision starts convolution biases at 0 and batch norms at the identity, where FullGrad's bias terms vanish"
    m, g = _model(arch), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(.1 * torch.randn(mod.num_features, generator=g)); mod.running_var.uniform_(.5, 2., generator=g)
                mod.bias.copy_(.1 * torch.randn(mod.num_features, generator=g))
            elif isinstance(mod, nn.Conv2d) and mod.bias is not None: mod.bias.copy_(.1 * torch.randn(mod.out_channels, generator=g))
    return m


def test_fullgrad_matches_pytorch_grad_cam(setup):
    "FullGrad over every Conv2d and BatchNorm2d bias (resnet18: batch norms; vgg11: convolutions followed by in-place ReLUs): pytorch-grad-cam's sum before its last scaling, and its output"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    arch, _, x, tg = setup
    theirs, m = _biased(arch), _biased(arch)
    with pgc.FullGrad(model=theirs, target_layers=[]) as cam:
        raw, agg = [], cam.aggregate_multi_layers
        cam.aggregate_multi_layers = lambda c: raw.append(c.sum(1)) or agg(c)
        full = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in tg]))
    _close(heatmap(m, x, targets=tg, method='fullgrad', norm=None), torch.from_numpy(raw[0]), rtol=1e-4)
    assert (heatmap(m, x, targets=tg, method='fullgrad') - full).abs().max() < 1e-3
    xg = x.clone().requires_grad_()  # not vacuous: the bias terms move the map away from the input's term alone
    gx = torch.autograd.grad(m(xg)[range(len(x)), tg].sum(), xg)[0]
    v = (gx * x).abs().flatten(2)
    v = ((v - v.amin(2, keepdim=True)) / (v.amax(2, keepdim=True) - v.amin(2, keepdim=True))).sum(1).view(full.shape)
    assert (normalize_maps(v) - full).abs().max() > 1e-2
