"""The wrappers that work over any method (issue 18): the noise tunnel (`smooth='smoothgrad' | 'smoothgrad_sq' |
'vargrad'`, captum's `NoiseTunnel` numbers given the same noise draws), `interpolation=`, `eigen_smooth=` (the CAM
family, against pytorch-grad-cam), several layers fused (`layer=[...]`, against pytorch-grad-cam) and `aug_smooth=`.
Parametrized over the registry where a wrapper applies to every method; the model comes back unchanged."""
import warnings
import pytest, torch
import torch.nn.functional as F
from fastai_heatmap import core
from fastai_heatmap.core import heatmap, explain, method_names, get_method, smooth_types
from conftest import model_state, assert_same_state, fast_options, close_to
from test_invariants import _small, _x

METHODS = method_names()
tvm = pytest.importorskip('torchvision.models')
warnings.filterwarnings('ignore', category=UserWarning)


def _run(model, x, name, **kw):
    return explain(model, x, method=name, **{**fast_options(name), **kw})


def _resnet(seed=0):
    torch.manual_seed(seed)
    return tvm.resnet18(weights=None, num_classes=10).eval()


def _same_range(n=2, size=32, seed=1):
    "Images whose range is exactly 1, so that captum's one `stdevs` is our `noise` × the range for every sample"
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0., 1.
    return x


# ---------------------------------------------------------------------------------------------- noise tunnel
@pytest.fixture
def same_noise(monkeypatch):
    "Inject the same draws ε (n, C, H, W) into ours and into captum's NoiseTunnel (which repeats each input n times, row i·n + k ← ε_k)"
    nt = pytest.importorskip('captum.attr._core.noise_tunnel')
    box = {}
    def ours(n, shape, generator):
        box['eps'] = torch.randn((n, *shape), generator=torch.Generator().manual_seed(123))
        return box['eps']
    def theirs(input, stdev, nt_samples_partition):
        eps = box['eps']
        assert eps.shape[0] == nt_samples_partition
        return input.repeat_interleave(nt_samples_partition, dim=0) + stdev * eps.repeat(input.shape[0], 1, 1, 1).to(input)
    monkeypatch.setattr(core, '_noise', ours)
    monkeypatch.setattr(nt.NoiseTunnel, '_add_noise_to_input', staticmethod(theirs))
    return box


@pytest.mark.parametrize('how', smooth_types)
@pytest.mark.parametrize('name,captum_cls', [('saliency', 'Saliency'), ('input_x_gradient', 'InputXGradient'), ('gradcam', 'LayerGradCam')])
def test_noise_tunnel_equals_captum(same_noise, how, name, captum_cls):
    "smooth='smoothgrad' | 'smoothgrad_sq' | 'vargrad' = captum's NoiseTunnel(nt_type=...) on the same noise draws, for input-gradient methods and one at a layer"
    attr = pytest.importorskip('captum.attr')
    m, x, tg, n, noise = _resnet(), _same_range(), [3, 7], 5, 0.2
    before = model_state(m)
    if name == 'gradcam':
        ours = heatmap(m, x, tg, method=name, layer='layer4', smooth=how, n_samples=n, noise=noise, upsample=False, norm=None, relu=False)
        base = attr.LayerGradCam(m, m.layer4)
    else:
        ours = heatmap(m, x, tg, method=name, smooth=how, n_samples=n, noise=noise, norm=None, relu=False, reduce=None)
        base = getattr(attr, captum_cls)(m)
    assert_same_state(before, model_state(m))
    kw = dict(abs=False) if name == 'saliency' else {}
    ref = attr.NoiseTunnel(base).attribute(x, nt_type=how, nt_samples=n, stdevs=noise * 1.0, target=tg, **kw).detach()
    if name == 'gradcam': ref = ref[:, 0]
    close_to(ours, ref, rtol=1e-4)
    assert not torch.allclose(ours, heatmap(m, x, tg, method=name, **({} if name == 'gradcam' else dict(reduce=None)), norm=None, relu=False,
                                            upsample=name != 'gradcam', layer='layer4' if name == 'gradcam' else None))  # the noise did something


def test_smooth_int_is_smoothgrad_and_the_types_agree():
    "smooth=n is smooth='smoothgrad', n_samples=n (today's contract); vargrad = smoothgrad_sq − smoothgrad²; smoothgrad_sq, vargrad ≥ 0"
    m, x = _small(), _x(2, 16)
    kw = dict(norm=None, relu=False, noise=0.1, upsample=False)  # the identity holds before upsampling (which is linear, the square is not)
    for name in ('saliency', 'gradcam', 'occlusion'):
        a = heatmap(m, x, method=name, smooth=4, **kw, **fast_options(name))
        torch.testing.assert_close(a, heatmap(m, x, method=name, smooth='smoothgrad', n_samples=4, **kw, **fast_options(name)))
        sq = heatmap(m, x, method=name, smooth='smoothgrad_sq', n_samples=4, **kw, **fast_options(name))
        var = heatmap(m, x, method=name, smooth='vargrad', n_samples=4, **kw, **fast_options(name))
        torch.testing.assert_close(var, sq - a * a, rtol=1e-4, atol=1e-5 * sq.max().item())  # E[a²] − E[a]², as captum (in float32: to the rounding of E[a²])
        assert (sq >= 0).all() and (var >= -1e-6 * sq.max()).all() and var.abs().max() > 0
    d = heatmap(m, x, method='saliency', smooth='smoothgrad', **kw)  # n_samples defaults to 20, as smooth=True
    torch.testing.assert_close(d, heatmap(m, x, method='saliency', smooth=True, **kw))
    torch.testing.assert_close(d, heatmap(m, x, method='saliency', smooth=20, **kw))


def test_scorecam_int_smooth_stays_ss_cam():
    "For ScoreCAM an int `smooth` keeps meaning SS-CAM's noisy masks; the named types are the noise tunnel over the input"
    m, x = _small(), _x(1, 16)
    ss = heatmap(m, x, method='scorecam', smooth=2)
    tunnel = heatmap(m, x, method='scorecam', smooth='smoothgrad', n_samples=2)
    assert not torch.allclose(ss, tunnel) and not torch.allclose(ss, heatmap(m, x, method='scorecam'))


@pytest.mark.parametrize('name', METHODS)
def test_every_method_takes_every_smoothing(name):
    "Each registered method under each noise-tunnel type: maps of the right shape, finite, per-example = batched, and the model unchanged"
    m, x = _small(), _x(2, 16)
    before = model_state(m)
    for how in smooth_types:
        e = _run(m, x, name, smooth=how, n_samples=2, noise=0.1, norm=None)
        assert e.maps.shape[:1] == (2,) and e.maps.shape[-2:] == (16, 16) and torch.isfinite(e.maps).all()
        if how != 'smoothgrad': assert (e.maps >= 0).all()
    one = _run(m, x[1:], name, smooth='vargrad', n_samples=2, noise=0.1, norm=None).maps
    torch.testing.assert_close(one[0], e.maps[1], rtol=1e-3, atol=1e-3 * e.maps[1].abs().max().item() + 1e-12)
    assert_same_state(before, model_state(m))


@pytest.mark.parametrize('bad,msg', [
    (dict(smooth='smoothgrads'), "Did you mean 'smoothgrad'"),
    (dict(smooth='noise'), "Unknown smooth 'noise'"),
    (dict(smooth=-1), "an int ≥ 1"),
    (dict(smooth=2.5), "an int ≥ 1"),
    (dict(n_samples=4), "pass smooth='smoothgrad'"),
    (dict(smooth=4, n_samples=8), "says otherwise"),
    (dict(smooth='vargrad', n_samples=0), "`n_samples` is the number"),
    (dict(smooth='vargrad', n_samples=True), "`n_samples` is the number"),
    (dict(smooth='vargrad', noise=0), "`noise` is"),
])
def test_smooth_bad_input(bad, msg):
    m, x = _small(), _x(1, 8)
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): heatmap(m, x, method='saliency', **bad)


# ---------------------------------------------------------------------------------------------- interpolation
def test_interpolation_modes():
    "The raw layer map upsampled by F.interpolate in each mode (half-pixel centres for bilinear and bicubic), then min-max; an unknown mode is refused"
    m, x = _small(), _x(2, 16)
    raw = heatmap(m, x, method='gradcam', upsample=False, norm=None)
    assert raw.shape[-2:] == (8, 8)
    for mode in ('bilinear', 'bicubic', 'nearest'):
        ref = F.interpolate(raw[:, None], size=(16, 16), mode=mode, align_corners=None if mode == 'nearest' else False)[:, 0]
        close_to(heatmap(m, x, method='gradcam', norm=None, interpolation=mode), ref)
    torch.testing.assert_close(heatmap(m, x, method='gradcam', norm=None, interpolation='nearest'), raw.repeat_interleave(2, 1).repeat_interleave(2, 2))
    torch.testing.assert_close(heatmap(m, x, method='gradcam'), heatmap(m, x, method='gradcam', interpolation='bilinear'))
    with pytest.raises(ValueError, match="Unknown interpolation 'cubic'"): heatmap(m, x, interpolation='cubic')
