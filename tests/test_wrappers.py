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


# ---------------------------------------------------------------------------------------------- eigen_smooth
def _pgc_run(cls_name, model, layers, x, tg, eigen_smooth=False):
    "pytorch-grad-cam's full-size maps, and its raw map for one layer (names in `model`)"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    mods = [model.get_submodule(l) for l in layers]
    T = [ClassifierOutputTarget(c) for c in tg]
    with getattr(pgc, cls_name)(model=model, target_layers=mods) as cam:
        full = cam(input_tensor=x, targets=T, eigen_smooth=eigen_smooth)
        if len(mods) > 1: return torch.from_numpy(full), None
        ag = cam.activations_and_grads
        acts, grads = ag.activations[0].numpy(), (ag.gradients[0].numpy() if ag.gradients else None)
        raw = cam.get_cam_image(x, mods[0], T, acts, grads, eigen_smooth)
    return torch.from_numpy(full), torch.from_numpy(raw)


@pytest.mark.parametrize('name,cls', [('gradcam', 'GradCAM'), ('xgradcam', 'XGradCAM'), ('layercam', 'LayerCAM'), ('hirescam', 'HiResCAM')])
def test_eigen_smooth_equals_pytorch_grad_cam(name, cls):
    "eigen_smooth=True: the projection of the weighted activations w_k·A_k on their first principal component, as pytorch-grad-cam's get_2d_projection (its sign fixed by us, arbitrary in theirs)"
    m, x, tg = _resnet(), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)), [1, 4, 7]
    before = model_state(m)
    ours_raw = heatmap(m, x, tg, method=name, layer='layer4', eigen_smooth=True, upsample=False, norm=None, relu=False)
    ours = heatmap(m, x, tg, method=name, layer='layer4', eigen_smooth=True)
    assert_same_state(before, model_state(m))
    full, raw = _pgc_run(cls, _resnet(), ['layer4'], x, tg, eigen_smooth=True)
    sign = torch.sign((ours_raw * raw).flatten(1).sum(1))
    close_to(ours_raw * sign[:, None, None], raw, rtol=1e-4)
    same = sign > 0  # where the signs agree, the full-size maps too (ReLU, min-max, cv2's bilinear resize)
    if same.any(): assert (ours[same] - full[same]).abs().max() < 1e-3
    assert not torch.allclose(ours_raw, heatmap(m, x, tg, method=name, layer='layer4', upsample=False, norm=None, relu=False), atol=1e-3 * ours_raw.abs().max())


@pytest.mark.parametrize('name', METHODS)
def test_eigen_smooth_on_every_method(name):
    "Every method: eigen_smooth=True works (CAM methods that weight their activations) or says clearly why not and which methods it applies to"
    m, x = _small(), _x(2, 16)
    before = model_state(m)
    if core._eigen_ok(get_method(name)):
        e = _run(m, x, name, eigen_smooth=True, norm=None)
        assert e.maps.shape == (2, 16, 16) and torch.isfinite(e.maps).all()
        # the projection, by hand, of the weights' activations: per sample, (hw, K) centred, onto its first right singular vector
        assert e.maps.abs().max() > 0
    else:
        with pytest.raises(ValueError, match='Methods it applies to: gradcam, '): _run(m, x, name, eigen_smooth=True)
    assert_same_state(before, model_state(m))


def test_eigen_smooth_by_hand():
    "On Grad-CAM: the first principal component of mean(∂y/∂A)·A over positions, centred; with the sign rule of Eigen-CAM"
    from fastai_heatmap.cam import first_component
    m, x = _small().eval(), _x(2, 16)
    ours = heatmap(m, x, targets=[0, 2], method='gradcam', layer='conv4', eigen_smooth=True, upsample=False, norm=None, relu=False)
    box = []
    h = m.conv4.register_forward_hook(lambda mod, i, o: box.append(o))
    out = m(x)
    h.remove()
    a = box[0]
    g = torch.autograd.grad(out[[0, 1], [0, 2]].sum(), a)[0]
    a = a.detach()
    wa = g.mean((2, 3))[:, :, None, None] * a
    mat = wa.flatten(2).transpose(1, 2)
    mat = mat - mat.mean(1, keepdim=True)
    v = torch.linalg.svd(mat, full_matrices=False).Vh[:, 0]
    p = torch.einsum('bnk,bk->bn', mat, v).view(2, 8, 8)
    close_to(ours * torch.sign((ours * p).flatten(1).sum(1))[:, None, None], p, rtol=1e-4)
    close_to(ours, first_component(wa), rtol=1e-4)
    for bad, msg in (('saliency', 'works on the input'), ('eigencam', 'already the first principal component'), ('dff', 'its map is its own')):
        with pytest.raises(ValueError, match=msg): heatmap(m, x, method=bad, eigen_smooth=True)
    with pytest.raises(TypeError, match='True or False'): heatmap(m, x, eigen_smooth='yes')


# ---------------------------------------------------------------------------------------------- several layers
@pytest.mark.parametrize('name,cls', [('gradcam', 'GradCAM'), ('layercam', 'LayerCAM'), ('gradcam++', 'GradCAMPlusPlus')])
def test_fused_layers_equal_pytorch_grad_cam(name, cls):
    "layer=['layer3', 'layer4'] = pytorch-grad-cam's target_layers=[layer3, layer4]: per layer ReLU, min-max, resize to the input; their mean; min-max"
    scale = 1e3 if name == 'gradcam++' else 1.  # its eps = 1e-6 in α's denominator: large scores, as in test_reference_methods
    def model():
        m = _resnet()
        with torch.no_grad(): m.fc.weight.mul_(scale); m.fc.bias.mul_(scale)
        return m
    m, x, tg = model(), torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)), [2, 5, 8]
    before = model_state(m)
    e = explain(m, x, tg, method=name, layer=['layer3', 'layer4'])
    assert_same_state(before, model_state(m))
    full, _ = _pgc_run(cls, model(), ['layer3', 'layer4'], x, tg)
    assert e.maps.shape == full.shape and (e.maps - full).abs().max() < 1e-3
    single, _ = _pgc_run(cls, model(), ['layer4'], x, tg)
    assert (e.maps - single).abs().max() > 1e-2  # the fusion did something
    assert e.layer == 'layer3 + layer4' and e.layer_size == (4, 4)


def test_fused_layers_by_hand():
    "The rule on the layers' own maps; upsample=False fuses at the largest layer's size; one layer in a list is that layer; bad lists are refused"
    m, x = _small(), _x(2, 16)
    raws = [heatmap(m, x, method='gradcam', layer=l, upsample=False, norm=None) for l in ('conv1', 'conv4')]
    norm = [core.normalize_maps(r) for r in raws]
    ref = core.normalize_maps((norm[0] + F.interpolate(norm[1][:, None], size=(16, 16), mode='bilinear', align_corners=False)[:, 0]) / 2)
    close_to(heatmap(m, x, method='gradcam', layer=['conv1', 'conv4']), ref)
    close_to(heatmap(m, x, method='gradcam', layer=['conv1', 'conv4'], upsample=False), ref)  # conv1 is at the input's size
    raws = [heatmap(m, x, method='gradcam', layer=l, upsample=False, norm=None) for l in ('conv2', 'conv4')]
    torch.testing.assert_close(heatmap(m, x, method='gradcam', layer=['conv2', 'conv4'], upsample=False, norm=None), (core.normalize_maps(raws[0]) + core.normalize_maps(raws[1])) / 2)
    torch.testing.assert_close(heatmap(m, x, method='gradcam', layer=['conv4']), heatmap(m, x, method='gradcam', layer='conv4'))
    with pytest.raises(ValueError, match='empty list'): heatmap(m, x, layer=[])
    with pytest.raises(ValueError, match='takes no layer'): heatmap(m, x, method='saliency', layer=['conv1', 'conv4'])
    with pytest.raises(ValueError, match="no layer named 'conv9'"): heatmap(m, x, layer=['conv1', 'conv9'])


@pytest.mark.parametrize('name', [n for n in METHODS if get_method(n).uses_layer and n != 'cam'])  # CAM exists only at the layer before the pooling: one layer
def test_every_layer_method_fuses_layers(name):
    m, x = _small(), _x(2, 16)
    before = model_state(m)
    e = _run(m, x, name, layer=['conv2', 'conv4'], norm=None)
    assert e.maps.shape == (2, 16, 16) and torch.isfinite(e.maps).all() and e.maps.max() <= 1 + 1e-6
    assert_same_state(before, model_state(m))


# ---------------------------------------------------------------------------------------------- aug_smooth
def _mirror_model(seed=0):
    "A fixed CNN that commutes with the horizontal flip: every kernel symmetric left-right, stride 1, an even pooling, global average"
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for c in (m[0], m[3]): c.weight.copy_((c.weight + c.weight.flip(-1)) / 2)
    return m


def test_aug_smooth_flips_map_back_exactly():
    "On a mirror-symmetric model the flipped map of the flipped image is the image's map, so aug_smooth=True changes nothing; on any model it is the mean of the two maps"
    m, x = _mirror_model(), _x(2, 16)
    for name in ('gradcam', 'saliency', 'occlusion'):
        kw = fast_options(name)
        plain = heatmap(m, x, method=name, **kw)
        torch.testing.assert_close(heatmap(m, x.flip(-1), method=name, **kw).flip(-1), plain, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(heatmap(m, x, method=name, aug_smooth=True, **kw), plain, rtol=1e-4, atol=1e-5)
    s, x = _small(), _x(2, 16)
    e = explain(s, x, method='gradcam', norm=None)
    flipped = explain(s, x.flip(-1), e.targets, method='gradcam', norm=None).maps.flip(-1)
    assert (flipped - e.maps).abs().max() > 1e-2 * e.maps.abs().max()  # not symmetric: the mean is not the map
    close_to(heatmap(s, x, method='gradcam', aug_smooth=True), core.normalize_maps((e.maps + flipped) / 2))
    torch.testing.assert_close(heatmap(s, x, method='gradcam', aug_smooth=[(lambda t: t, lambda t: t)]), heatmap(s, x, method='gradcam'))
    with pytest.raises(TypeError, match='list of \\(augment, map back\\) pairs'): heatmap(s, x, aug_smooth='flip')


@pytest.mark.parametrize('name', METHODS)
def test_every_method_takes_aug_smooth(name):
    "Every method: aug_smooth of the mirrored batch is the mirrored aug_smooth (the same two maps, exactly), and the model comes back unchanged"
    m, x = _small(), _x(2, 16)
    before = model_state(m)
    a = _run(m, x, name, aug_smooth=True).maps
    b = _run(m, x.flip(-1), name, aug_smooth=True).maps
    assert a.shape[0] == 2 and a.shape[-2:] == (16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(b, a.flip(-1), rtol=1e-5, atol=1e-6)
    assert_same_state(before, model_state(m))
