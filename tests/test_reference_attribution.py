"""The attribution family and Deep Feature Factorization against their peers, on the same models, inputs and classes (one
*different* class per sample, so that a mix-up of targets across the batch would show), and with the same random draws
where the method is stochastic.

- captum 0.9: integrated gradients with each of its five rules; DeepLift and DeepLiftShap (rescale rule, captum's max-pooling
  rule, baselines as captum takes them); GradientShap (captum's random draws replaced by ours); LRP with the epsilon and
  gamma rules on convolutions, linear layers and batch norms; FeatureAblation, Lime (its default Lasso, and least squares)
  and KernelShap over a grid of patches and over a mask of the user's, with our draws given to captum as its `perturb_func`.
- pytorch-grad-cam 1.5: Deep Feature Factorization. NMF finds a local optimum that depends on its random start, so what is
  compared is what is comparable: from pytorch-grad-cam's own start (scikit-learn's 'random' init with `random_state=0`,
  rebuilt with numpy), our `nmf` gives its concepts and maps; from our own start, the reconstruction error is as small; and
  the class scores of the same concepts through `head=model.fc` are its `computation_on_concepts`.

Where we differ from captum on purpose, a test shows the difference and its cause.
"""
import warnings
import numpy as np
import pytest, torch
from torch import nn

from fastai_heatmap.core import heatmap, get_method
from fastai_heatmap.perturbation import grid_mask
from fastai_heatmap.concepts import nmf, factorize
from conftest import close_to

tvm = pytest.importorskip('torchvision.models')
attr = pytest.importorskip('captum.attr')
warnings.filterwarnings('ignore', category=UserWarning)


_close = close_to  # conftest's

def _targets(model, x):
    "Each sample's best-scoring class not taken by an earlier sample"
    with torch.no_grad(): order = model(x).argsort(1, descending=True).tolist()
    tg = []
    for o in order: tg.append(next(c for c in o if c not in tg))
    return tg

def _raw(model, x, tg, method, **kw):
    "Our attributions per colour channel (B, C, H, W), signed and unscaled, as captum returns them"
    return heatmap(model, x, targets=tg, method=method, reduce=None, relu=False, norm=None, **kw)


@pytest.fixture(scope='module')
def vgg():
    "A random vgg11_bn with batch-norm statistics that are not the identity"
    torch.manual_seed(0)
    m = tvm.vgg11_bn(weights=None, num_classes=10).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d): bn.running_mean.normal_(0, .2); bn.running_var.uniform_(.5, 1.5); bn.weight.uniform_(.5, 1.5); bn.bias.normal_(0, .1)
    return m

@pytest.fixture(scope='module')
def xv(): return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Clone(nn.Module):
    "A no-op that makes a new tensor"
    def forward(self, x): return x.clone()

def _pool_cnn(between=True, seed=0):
    "A CNN with batch norm, ReLUs, two max poolings, tanh and linear layers, with (or without) a no-op between each ReLU and the max pooling after it"
    torch.manual_seed(seed)
    gap = (lambda: [Clone()]) if between else (lambda: [])
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), *gap(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), *gap(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    with torch.no_grad(): m[1].running_mean.normal_(0, .3); m[1].running_var.uniform_(.5, 1.5)
    return m

@pytest.fixture(scope='module')
def xs(): return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))

@pytest.fixture(scope='module')
def refs(): return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize('rule', ['riemann_middle', 'riemann_left', 'riemann_right', 'riemann_trapezoid', 'gausslegendre'])
def test_integrated_gradients_rules_match_captum(vgg, xv, rule):
    tg = _targets(vgg, xv)
    base = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5)) * .1
    ours = _raw(vgg, xv, tg, 'integrated_gradients', steps=7, rule=rule, baseline=base, batch_size=5)
    ref = attr.IntegratedGradients(vgg).attribute(xv, baselines=base[None], target=torch.tensor(tg), n_steps=7, method=rule)
    _close(ours, ref)

def test_deeplift_matches_captum(xs, refs):
    "The zero baseline (captum's default) and an image as the baseline, on a CNN with batch norm and two max poolings (see the next test for why the no-ops)"
    m = _pool_cnn()
    tg = _targets(m, xs)
    _close(_raw(m, xs, tg, 'deeplift'), attr.DeepLift(m).attribute(xs, target=torch.tensor(tg)))
    _close(_raw(m, xs, tg, 'deeplift', baseline=refs[0]), attr.DeepLift(m).attribute(xs, baselines=refs[:1], target=torch.tensor(tg)))

def test_deeplift_differs_from_captum_only_by_its_relu_then_maxpool_hooks(xs, refs):
    """captum's DeepLift changes when a no-op module sits between a ReLU module and a max-pooling module (its ReLU hook reads the
    gradient before the max-pooling rule replaces it, when both hook one tensor); ours computes the same function either way, and
    equals captum's with the no-op"""
    with_gap, without = _pool_cnn(True), _pool_cnn(False)
    tg = _targets(with_gap, xs)
    t = torch.tensor(tg)
    ours_a, ours_b = _raw(with_gap, xs, tg, 'deeplift', baseline=refs[0]), _raw(without, xs, tg, 'deeplift', baseline=refs[0])
    theirs_a, theirs_b = (attr.DeepLift(m).attribute(xs, baselines=refs[:1], target=t) for m in (with_gap, without))
    _close(ours_b, ours_a)
    _close(ours_a, theirs_a)
    assert (theirs_b - theirs_a).abs().max() > 1e-2 * theirs_a.abs().max()

def test_deepliftshap_matches_captum(xs, refs):
    m = _pool_cnn()
    tg = _targets(m, xs)
    _close(_raw(m, xs, tg, 'deepliftshap', baselines=refs, batch_size=5), attr.DeepLiftShap(m).attribute(xs, baselines=refs, target=torch.tensor(tg)))
    _close(_raw(m, xs, tg, 'deepliftshap', baselines=lambda x: refs), _raw(m, xs, tg, 'deepliftshap', baselines=refs)) # a function of the batch

def test_gradientshap_matches_captum_with_the_same_draws(vgg, xv, monkeypatch):
    "captum draws the baselines' indices and α with numpy and the noise with torch.normal: they are replaced by our draws, in captum's order (image by image)"
    import captum._utils.common as cc, captum.attr._core.gradient_shap as cg, captum.attr._core.noise_tunnel as cn
    tg, S, B = _targets(vgg, xv), 6, len(xv)
    refs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    kw = dict(samples=S, baselines=refs, stdevs=.3)
    _, j, a, eps = get_method('gradientshap', **kw).draws(xv, torch.Generator().manual_seed(0)) # the engine's generator, seeded with 0
    monkeypatch.setattr(cc.np.random, 'choice', lambda n, size: np.tile(j.numpy(), B))
    monkeypatch.setattr(cg.np.random, 'uniform', lambda lo, hi, size: np.tile(a.double().numpy(), B))
    monkeypatch.setattr(cn.torch, 'normal', lambda mean, std: eps.repeat(B, 1, 1, 1))
    ref = attr.GradientShap(vgg).attribute(xv, baselines=refs, n_samples=S, stdevs=.3, target=torch.tensor(tg))
    monkeypatch.undo()
    _close(_raw(vgg, xv, tg, 'gradientshap', batch_size=7, **kw), ref)

@pytest.mark.parametrize('rules', [{}, dict(conv='gamma'), dict(linear='gamma'), dict(bn='gamma'), dict(conv='gamma', linear='gamma', bn='gamma')])
def test_lrp_matches_captum(vgg, xv, rules):
    "captum's LRP with its `EpsilonRule` (default) or `GammaRule` set on each layer of that kind"
    from captum.attr._utils.lrp_rules import GammaRule
    tg = _targets(vgg, xv)
    ours = _raw(vgg, xv, tg, 'lrp', **rules)
    kinds = {nn.Conv2d: 'conv', nn.Linear: 'linear', nn.BatchNorm2d: 'bn'}
    try:
        for mod in vgg.modules():
            if rules.get(kinds.get(type(mod))) == 'gamma': mod.rule = GammaRule()
        ref = attr.LRP(vgg).attribute(xv, target=torch.tensor(tg))
    finally:
        for mod in vgg.modules():
            if hasattr(mod, 'rule'): del mod.rule
    _close(ours, ref, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- perturbation
@pytest.fixture(scope='module')
def resnet():
    "A random resnet18 whose last layer is scaled up, so that its probabilities move when patches are removed (else every comparison is of near-zeros)"
    torch.manual_seed(0)
    m = tvm.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad(): m.fc.weight.mul_(10); m.fc.bias.mul_(10)
    return m

@pytest.fixture(scope='module')
def xr(): return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

def _probs(model): return lambda inp: model(inp).softmax(-1) # ours reads the class's probability

def _fed(z):
    "A captum `perturb_func` that yields our draws, one row at a time"
    def gen(original_inp, **kwargs):
        for row in z: yield row[None].long()
    return gen

MASKS = dict(grid=None, own=lambda: (torch.arange(32)[:, None] // 11 * 3 + torch.arange(32)[None] // 11).long()) # 3×3 uneven patches

@pytest.mark.parametrize('mask', list(MASKS))
def test_feature_ablation_matches_captum(resnet, xr, mask):
    tg = _targets(resnet, xr)
    m = grid_mask(32, 32, 4) if mask == 'grid' else MASKS[mask]()
    kw = dict(grid=4) if mask == 'grid' else dict(mask=m)
    ours = heatmap(resnet, xr, targets=tg, method='feature_ablation', relu=False, norm=None, batch_size=10, **kw)
    ref = attr.FeatureAblation(_probs(resnet)).attribute(xr, target=torch.tensor(tg), feature_mask=m[None, None], perturbations_per_eval=8)
    _close(ours, ref[:, 0])

@pytest.mark.parametrize('mask', list(MASKS))
@pytest.mark.parametrize('alpha', [0.01, 0.])
def test_lime_matches_captum_with_the_same_draws(resnet, xr, mask, alpha):
    "captum's Lime with its default similarity (cosine distance, kernel width 1) and its default SkLearnLasso(alpha=0.01), or least squares (alpha=0)"
    from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression
    with torch.no_grad(): tg = resnet(xr).argmax(1).tolist() # the predicted classes: others' probabilities move too little for a Lasso with alpha=0.01 to keep any feature
    S = 40
    m = grid_mask(32, 32, 4) if mask == 'grid' else MASKS[mask]()
    kw = dict(grid=4) if mask == 'grid' else dict(mask=m)
    z = get_method('lime', samples=S, **kw).draw(int(m.max()) + 1, torch.Generator().manual_seed(0))
    ours = heatmap(resnet, xr, targets=tg, method='lime', samples=S, alpha=alpha, relu=False, norm=None, **kw)
    ref = torch.cat([attr.Lime(_probs(resnet), interpretable_model=SkLearnLasso(alpha=alpha) if alpha else SkLearnLinearRegression(), perturb_func=_fed(z))
                     .attribute(xr[i:i+1], target=t, feature_mask=m[None, None], n_samples=S, perturbations_per_eval=S) for i, t in enumerate(tg)])
    assert (ref != 0).any(dim=(1, 2, 3)).all(), 'a Lasso of all zeros: the comparison would be vacuous'
    _close(ours, ref[:, 0], rtol=1e-4) # scikit-learn's coordinate descent stops at its tolerance; ours goes further

@pytest.mark.parametrize('mask', list(MASKS))
def test_kernelshap_matches_captum_with_the_same_draws(resnet, xr, mask):
    tg, S = _targets(resnet, xr), 40
    m = grid_mask(32, 32, 4) if mask == 'grid' else MASKS[mask]()
    kw = dict(grid=4) if mask == 'grid' else dict(mask=m)
    z = get_method('kernelshap', samples=S, **kw).draw(int(m.max()) + 1, torch.Generator().manual_seed(0))
    refs = []
    for i, t in enumerate(tg):
        ks = attr.KernelShap(_probs(resnet))
        ks.perturb_func = _fed(z) # its own draws are the all-features and no-feature rows, then random subsets: ours have the same form
        refs.append(ks.attribute(xr[i:i+1], target=t, feature_mask=m[None, None], n_samples=S, perturbations_per_eval=S))
    ours = heatmap(resnet, xr, targets=tg, method='kernelshap', samples=S, relu=False, norm=None, **kw)
    _close(ours, torch.cat(refs)[:, 0], rtol=1e-4)


# ---------------------------------------------------------------------------------------------- Deep Feature Factorization
@pytest.fixture(scope='module')
def dff_setup():
    pgc = pytest.importorskip('pytorch_grad_cam.feature_factorization.deep_feature_factorization')
    torch.manual_seed(0)
    m = tvm.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    acts = {}
    h = m.layer4.register_forward_hook(lambda mod, i, o: acts.__setitem__('a', o.detach()))
    with torch.no_grad(): m(x)
    h.remove()
    return pgc, m, x, acts['a']

def _pgc_start(X, k):
    "scikit-learn's NMF init='random' with random_state=0, as pytorch-grad-cam's `dff` calls it: H first, then W"
    avg = np.sqrt(X.mean() / k)
    rng = np.random.RandomState(0)
    H = np.abs(avg * rng.standard_normal((k, X.shape[1])).astype(X.dtype))
    W = np.abs(avg * rng.standard_normal((X.shape[0], k)).astype(X.dtype))
    return torch.from_numpy(W), torch.from_numpy(H)

def test_nmf_from_pytorch_grad_cams_start_gives_its_concepts(dff_setup):
    pgc, m, x, a = dff_setup
    K = 5
    concepts, expl = pgc.dff(a.numpy().copy(), n_components=K) # (C, K), (B, K, h, w)
    B, C, h, w = a.shape
    X = a.permute(1, 0, 2, 3).reshape(C, -1)
    off = X.amin(1, keepdim=True)
    W, H = nmf(X - off, K, init=_pgc_start((X - off).numpy(), K))
    _close(W + off, concepts, rtol=1e-4)
    _close(H.view(K, B, h, w).transpose(0, 1), expl, rtol=1e-4)

def test_dff_is_as_good_from_its_own_start_and_scores_as_pytorch_grad_cam(dff_setup):
    pgc, m, x, a = dff_setup
    K = 5
    concepts, expl = pgc.dff(a.numpy().copy(), n_components=K)
    B, C, h, w = a.shape
    X = a.permute(1, 0, 2, 3).reshape(C, -1)
    off = X.amin(1, keepdim=True)
    theirs = ((X - off) - torch.from_numpy(concepts - off.numpy()) @ torch.from_numpy(expl).transpose(0, 1).reshape(K, -1)).norm() / (X - off).norm()
    c = factorize(m, x, K, layer='layer4', joint=True, upsample=False, head=m.fc)
    ours = ((X - off) - (c.vectors[0] - off) @ c.maps.transpose(0, 1).reshape(K, -1)).norm() / (X - off).norm()
    assert ours <= theirs * 1.02, (ours, theirs)
    # the peer's class scores are its `computation_on_concepts` (here the model's fc) of its concepts; ours are the same of ours,
    # and the default (the model run from the layer on, with the concept at every position) gives the same numbers
    d = pgc.DeepFeatureFactorization(model=m, target_layer=m.layer4, computation_on_concepts=m.fc)
    _, _, scores = d(x, K)
    d.activations_and_grads.release()
    _close(torch.from_numpy(scores), m.fc(torch.from_numpy(concepts).T).detach())
    _close(c.scores[0], m.fc(c.vectors[0].T).detach())
    _close(factorize(m, x, K, layer='layer4', joint=True).scores, c.scores, rtol=1e-4)


def test_dff_maps_as_pytorch_grad_cam_normalizes_them(dff_setup):
    "pytorch-grad-cam's maps are min-max normalized per (image, concept) at the layer's resolution, then resized (cv2, bilinear): from the same factors, ours scaled so are the same"
    pgc, m, x, a = dff_setup
    d = pgc.DeepFeatureFactorization(model=m, target_layer=m.layer4)
    concepts, maps = d(x, 4)
    d.activations_and_grads.release()
    maps = torch.from_numpy(np.stack(maps)) # (B, K, 96, 96)
    B, C, h, w = a.shape
    X = a.permute(1, 0, 2, 3).reshape(C, -1)
    off = X.amin(1, keepdim=True)
    W, H = nmf(X - off, 4, init=_pgc_start((X - off).numpy(), 4))
    H = H.view(4, B, h, w).transpose(0, 1)
    lo, hi = H.amin((-2, -1), keepdim=True), H.amax((-2, -1), keepdim=True)
    ours = torch.nn.functional.interpolate((H - lo) / (hi - lo), size=(96, 96), mode='bilinear', align_corners=False) # normalized, then resized, as the peer
    assert (ours - maps).abs().max() < 1e-4
