"""The faithfulness metrics against their peers, on the same maps, model and random draws: ROAD's noisy linear imputation and
its MoRF / LeRF / combined scores against pytorch-grad-cam's (its scipy solve, its numpy percentiles), the change in confidence
against pytorch-grad-cam's CamMultImageConfidenceChange / DropInConfidence / IncreaseInConfidence, infidelity and max-sensitivity
against captum's. A seeded, untrained torchvision resnet18 (random weights: what it learned plays no part), a seeded batch, and
each sample's best-scoring class; then the model left as it was, per-example against batched, and bad input."""
from unittest import mock
import numpy as np, pytest, torch
import torch.nn.functional as F
from fastai_heatmap.core import heatmap, explain, method_names
from fastai_heatmap.faithfulness import *
from conftest import model_state, assert_same_state

tvm = pytest.importorskip('torchvision.models')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return tvm.resnet18(weights=None, num_classes=10).eval()

@pytest.fixture(scope='module')
def xb(): return torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))

@pytest.fixture(scope='module')
def maps(model, xb): return heatmap(model, xb, method='gradcam', layer='layer3')

@pytest.fixture(scope='module')
def targets(model, xb):
    with torch.no_grad(): return model(xb).argmax(1)

def _pgc_targets(targets, softmax=True):
    mt = pytest.importorskip('pytorch_grad_cam.utils.model_targets')
    return [(mt.ClassifierOutputSoftmaxTarget if softmax else mt.ClassifierOutputTarget)(int(t)) for t in targets]


# ------------------------------------------------------------------------------------------------- ROAD
def test_imputation_equals_pytorch_grad_cams(xb, maps):
    road_mod = pytest.importorskip('pytorch_grad_cam.metrics.road')
    for q in (0.1, 0.5, 0.9): # most, half, few of the pixels removed
        keep = maps < maps.flatten(1).quantile(q, dim=1)[:, None, None]
        ours = noisy_linear_imputation(xb, keep, noise=0.)
        ref = torch.stack([road_mod.NoisyLinearImputer(noise=0.)(xb[i], keep[i].float()) for i in range(len(xb))])
        assert (~keep).any() and keep.any()
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        assert torch.equal(ours[keep[:, None].expand_as(xb)], xb[keep[:, None].expand_as(xb)]) # kept pixels untouched


def _same_noise(eps):
    "pytorch-grad-cam's imputer, made to draw its noise from `eps` (C, H, W) at the pixels it imputes, in its order"
    road_mod = pytest.importorskip('pytorch_grad_cam.metrics.road')
    orig, state = road_mod.NoisyLinearImputer.__call__, {}
    def call(self, img, mask):
        state['missing'] = mask.reshape(-1) == 0
        return orig(self, img, mask)
    def randn_like(t, *args, **kwargs):
        res = eps.reshape(len(eps), -1)[:, state['missing']]
        assert res.shape == t.shape
        return res
    return mock.patch.object(road_mod.NoisyLinearImputer, '__call__', call), mock.patch('torch.randn_like', randn_like)


@pytest.mark.parametrize('softmax', [True, False])
def test_road_equals_pytorch_grad_cams(model, xb, maps, targets, softmax):
    road_mod = pytest.importorskip('pytorch_grad_cam.metrics.road')
    tg, cams = _pgc_targets(targets, softmax), maps.numpy()
    eps = torch.randn(xb.shape[1:], generator=torch.Generator().manual_seed(0)) # what `road(seed=0)` draws, times `noise`
    a, b = _same_noise(eps) # pytorch-grad-cam multiplies a standard normal draw by its noise, 0.01
    with a, b:
        morf = road_mod.ROADMostRelevantFirstAverage()(xb, cams, tg, model)
        lerf = road_mod.ROADLeastRelevantFirstAverage()(xb, cams, tg, model)
        comb = road_mod.ROADCombined()(xb, cams, tg, model)
        at80 = road_mod.ROADMostRelevantFirst(80)(xb, cams, tg, model)
    r = road(model, xb, maps, act=None if softmax else (lambda o: o), batch_size=7)
    np.testing.assert_allclose(r.morf_score.numpy(), morf, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.lerf_score.numpy(), lerf, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.combined.numpy(), comb, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose((r.morf[:, 7] - r.before).numpy(), at80, rtol=1e-4, atol=1e-6) # percentile 80 alone
    assert np.abs(comb).min() > 1e-4 # not vacuous


# ------------------------------------------------------------------------------------------------- average drop / increase
def test_confidence_equals_pytorch_grad_cams(model, xb, maps, targets):
    cmi = pytest.importorskip('pytorch_grad_cam.metrics.cam_mult_image')
    tg, cams = _pgc_targets(targets), maps.numpy()
    c = confidence_change(model, xb, maps)
    np.testing.assert_allclose((c.after - c.before).numpy(), cmi.CamMultImageConfidenceChange()(xb, cams, tg, model), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose((c.before - c.after).clamp_min(0).numpy(), cmi.DropInConfidence()(xb, cams, tg, model), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(c.increase.float().numpy(), cmi.IncreaseInConfidence()(xb, cams, tg, model))
    with torch.no_grad(): before = model(xb).softmax(-1).gather(1, targets[:, None])[:, 0]
    np.testing.assert_allclose(c.drop.numpy(), ((c.before - c.after).clamp_min(0) / before).numpy(), rtol=1e-5) # Chattopadhay et al.'s: relative


# ------------------------------------------------------------------------------------------------- infidelity
@pytest.mark.parametrize('perturb', ['square', 'noise'])
@pytest.mark.parametrize('normalize', [True, False])
def test_infidelity_equals_captums(model, xb, maps, targets, perturb, normalize):
    cm = pytest.importorskip('captum.metrics')
    I = infidelity_perturbations(xb.shape[1:], perturb, 6, seed=3)
    def perturb_func(inputs): # captum repeats each input n_perturb_samples times, sample by sample
        k = torch.arange(len(inputs)) % len(I)
        return I[k], (torch.where(I[k] > 0, torch.zeros_like(inputs), inputs) if perturb == 'square' else inputs - I[k])
    ref = cm.infidelity(lambda x: model(x).softmax(-1), perturb_func, xb, maps[:, None].expand_as(xb).contiguous(), target=targets,
                        n_perturb_samples=6, normalize=normalize)
    ours = infidelity(model, xb, maps, perturb=perturb, n_samples=6, seed=3, normalize=normalize, batch_size=4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-9)
    attr = pytest.importorskip('captum.attr') # attributions with their channels: captum's Saliency, signed
    sal = attr.Saliency(model).attribute(xb, target=targets, abs=False)
    ref = cm.infidelity(lambda x: model(x).softmax(-1), perturb_func, xb, sal, target=targets, n_perturb_samples=6, normalize=normalize)
    torch.testing.assert_close(infidelity(model, xb, sal, perturb=perturb, n_samples=6, seed=3, normalize=normalize), ref, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------------------------- max-sensitivity
def _perturbs(xb, n, radius=0.02, seed=0):
    d = radius * (2 * torch.rand((n, *xb.shape[1:]), generator=torch.Generator().manual_seed(seed)) - 1) # what `sensitivity_max` draws
    return lambda inputs, r=radius: inputs + d[torch.arange(len(inputs)) % n]

def _one(inputs): return inputs[0] if isinstance(inputs, tuple) else inputs

@pytest.mark.parametrize('method,kw', [('gradcam', dict(layer='layer3')), ('saliency', dict(norm=None)), ('guided', {})])
def test_sensitivity_equals_captums(model, xb, targets, method, kw):
    cm = pytest.importorskip('captum.metrics')
    expl = lambda inputs, target: (heatmap(model, _one(inputs), target, method=method, **kw),)
    ref = cm.sensitivity_max(expl, xb, perturb_func=_perturbs(xb, 5), n_perturb_samples=5, target=targets)
    ours = sensitivity_max(model, xb, method=method, n_samples=5, batch_size=4, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all()

def test_sensitivity_of_captums_saliency(model, xb, targets):
    "Our saliency's max-sensitivity is that of captum's own Saliency (|gradient|, max over the colour channels)"
    cm, attr = pytest.importorskip('captum.metrics'), pytest.importorskip('captum.attr')
    sal = attr.Saliency(model)
    ref = cm.sensitivity_max(lambda inputs, target: (sal.attribute(_one(inputs), target=target).amax(1),), xb, perturb_func=_perturbs(xb, 4, 0.05, 2),
                             n_perturb_samples=4, target=targets)
    torch.testing.assert_close(sensitivity_max(model, xb, method='saliency', norm=None, n_samples=4, radius=0.05, seed=2), ref, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------- batching, state, bad input
def test_each_image_alone_equals_the_batch(model, xb, maps):
    full = (road(model, xb, maps, percentiles=[25, 75]).combined, confidence_change(model, xb, maps).after, infidelity(model, xb, maps, n_samples=3),
            sensitivity_max(model, xb, method='saliency', n_samples=3))
    one = (road(model, xb[2:], maps[2:], percentiles=[25, 75]).combined, confidence_change(model, xb[2:], maps[2:]).after,
           infidelity(model, xb[2:], maps[2:], n_samples=3), sensitivity_max(model, xb[2:], method='saliency', n_samples=3))
    for a, b in zip(full, one): torch.testing.assert_close(a[2:], b, rtol=1e-4, atol=1e-6)


def test_the_model_comes_back_as_it_was(model, xb, maps):
    model.train()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    try:
        before = model_state(model)
        road(model, xb, maps, percentiles=[50]); confidence_change(model, xb, maps); infidelity(model, xb, maps, n_samples=2)
        sensitivity_max(model, xb, method='gradcam', n_samples=2)
        assert_same_state(before, model_state(model))
    finally:
        model.fc.weight.grad = None
        model.eval()


def test_the_metrics_are_registered():
    assert metric_names() == ['deletion', 'insertion', 'road', 'confidence', 'infidelity', 'sensitivity']
    df = list_metrics()
    assert list(df.name) == metric_names() and 'road ↑, road_morf ↓, road_lerf ↑' in list(df['columns'])
    assert higher_is_better('road') and not higher_is_better('road_morf') and not higher_is_better('seconds_per_image')


@pytest.mark.parametrize('call,exc,msg', [
    (lambda m, x, h: road(m, x, h[:, :8]), ValueError, "at the images' resolution"),
    (lambda m, x, h: road(m, x, h, percentiles=[-1]), ValueError, '`percentiles` should be numbers from 0 to 100'),
    (lambda m, x, h: road(m, x, h, batch_size=0), ValueError, '`batch_size` should be an int ≥ 1'),
    (lambda m, x, h: road(m, x, h, targets=10), IndexError, 'out of range'),
    (lambda m, x, h: confidence_change(m, x, h.numpy()), TypeError, '`maps` should be a tensor'),
    (lambda m, x, h: infidelity(m, x, h, n_samples=0), ValueError, '`n_samples` should be an int ≥ 1'),
    (lambda m, x, h: infidelity(m, x, h, perturb='blur'), ValueError, "Unknown perturb 'blur'"),
    (lambda m, x, h: infidelity(m, x, h, perturb='noise', noise=0), ValueError, '`noise` is the noise'),
    (lambda m, x, h: infidelity(m, x, h, baseline='mean'), TypeError, '`baseline` should be a number'),
    (lambda m, x, h: sensitivity_max(m, x, method='nope'), ValueError, "Unknown method 'nope'"),
    (lambda m, x, h: sensitivity_max(m, x, radius=-1), ValueError, '`radius` is the largest change'),
    (lambda m, x, h: sensitivity_max(m, x, maps=h[:2], targets=0), ValueError, 'Got 2 maps for 3 images'),
    (lambda m, x, h: noisy_linear_imputation(x, h > 0.5, noise=0., max_iter=1), UserWarning, 'stopped after 1 iterations'),
])
def test_bad_input(model, xb, maps, call, exc, msg):
    if exc is UserWarning:
        with pytest.warns(UserWarning, match=msg): call(model, xb, maps)
        return
    with pytest.raises(exc) as e: call(model, xb, maps)
    assert msg in str(e.value), str(e.value)
