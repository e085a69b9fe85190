"""Cross-check fastai_heatmap's Grad-CAM and CAM against the reference libraries: captum, torchcam, pytorch-grad-cam.

Small random-weight torchvision resnet18s (no pretrained weights), a seeded batch of 3 images of 96x96 (layer3 gives
6x6 maps, layer4 3x3), and one *different* class per sample, so that a mix-up of targets across the batch would show.
With random weights, the ReLU'd map of a low-scoring class is often all zeros, which would make comparisons vacuous:
each sample explains its best-scoring class not already taken by an earlier sample (and the tests check the maps are
not empty).
Each library is imported with `pytest.importorskip`, so a missing one skips its tests only.
"""
import pytest, torch
import torch.nn.functional as F

from fastai_heatmap.core import heatmap

tvm = pytest.importorskip('torchvision.models')



def _model(seed=0):
    torch.manual_seed(seed)
    return tvm.resnet18(weights=None, num_classes=10).eval()

@pytest.fixture(scope='module')
def model(): return _model()

@pytest.fixture(scope='module')
def xb(): return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))

@pytest.fixture(scope='module')
def targets(model, xb):
    "One class per sample, all different: each sample's best-scoring class not taken by an earlier sample"
    with torch.no_grad(): order = model(xb).argsort(1, descending=True).tolist()
    res = []
    for o in order: res.append(next(c for c in o if c not in res))
    assert len(set(res)) == len(xb)
    return res

def _ours_raw(model, xb, layer, targets, **kw):
    return heatmap(model, xb, targets=targets, method='gradcam', layer=layer, upsample=False, norm=None, relu=True, **kw)

def _assert_close_rel(ours, ref, rtol=1e-5):
    "Equal to `rtol`, relative to the reference's largest value (maps are ~0 in many places, so elementwise rtol alone is too strict)"
    ref = ref.detach().float()
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0, "the reference map is all zeros: the comparison would be vacuous"
    torch.testing.assert_close(ours.detach().float(), ref, rtol=rtol, atol=rtol * ref.abs().max().item())

def _assert_maps_informative(maps):
    "Every map has some positive evidence, and the maps depend on the target (else the targets check proves nothing)"
    assert (maps.flatten(1).amax(1) > 0).all(), "a map is all zeros: pick another seed"


@pytest.mark.parametrize('layer', ['layer4', 'layer3'])
def test_targets_matter(model, xb, layer, targets):
    "Sanity check of the fixtures: with these weights, explaining another class gives another map"
    a = _ours_raw(model, xb, layer, targets)
    b = _ours_raw(model, xb, layer, targets[1:] + targets[:1])
    _assert_maps_informative(a)
    assert not torch.allclose(a, b, rtol=1e-2, atol=1e-2 * a.abs().max().item())


# ------------------------------------------------------------------------------------------------- captum
@pytest.mark.parametrize('layer', ['layer4', 'layer3'])
def test_gradcam_matches_captum(model, xb, layer, targets):
    "Raw layer-resolution Grad-CAM equals captum's LayerGradCam (ReLU'd), sample by sample with per-sample targets"
    attr = pytest.importorskip('captum.attr')
    ours = _ours_raw(model, xb, layer, targets)
    ref = attr.LayerGradCam(model, model.get_submodule(layer)).attribute(xb, target=torch.tensor(targets), relu_attributions=True)
    assert ref.shape[1] == 1
    _assert_close_rel(ours, ref[:, 0])
    # and without the ReLU the signed maps agree too: explain each sample's lowest-scoring class, whose map has negatives
    with torch.no_grad(): worst = model(xb).argmin(1)
    ours_signed = heatmap(model, xb, targets=worst, layer=layer, upsample=False, norm=None, relu=False)
    ref_signed = attr.LayerGradCam(model, model.get_submodule(layer)).attribute(xb, target=worst)
    assert (ref_signed < 0).any()
    _assert_close_rel(ours_signed, ref_signed[:, 0])


# ------------------------------------------------------------------------------------------------- torchcam
@pytest.mark.parametrize('layer', ['layer4', 'layer3'])
def test_gradcam_matches_torchcam(model, xb, layer, targets):
    "Raw Grad-CAM equals torchcam's GradCAM with `normalized=False` (torchcam applies the ReLU too); normalized maps agree as well"
    methods = pytest.importorskip('torchcam.methods')
    ours = _ours_raw(model, xb, layer, targets)
    with methods.GradCAM(model, layer) as extractor:  # torchcam 0.5: hooks live inside the `with`; forward with grad
        scores = model(xb)
        raw = extractor(targets, scores, normalized=False)[0]
    _assert_close_rel(ours, raw)
    with methods.GradCAM(model, layer) as extractor:
        scores = model(xb)
        normed = extractor(targets, scores)[0]  # min-max per map, at layer resolution (torchcam adds eps=1e-8 to the max)
    ours_normed = heatmap(model, xb, targets=targets, layer=layer, upsample=False, norm='image')
    torch.testing.assert_close(ours_normed, normed, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- pytorch-grad-cam
# pytorch-grad-cam's GradCAM: ReLU(sum_k mean(grad_k) A_k), min-max normalized per map at layer resolution
# (with 1e-7 added to the max), resized with cv2.resize (bilinear, half-pixel centres = torch's align_corners=False),
# then min-max normalized again. Bilinear resizing commutes with the affine min-max, so that is exactly our default
# `heatmap(..., upsample=True, norm='image')`, up to float32 and cv2-vs-torch rounding: we compare the full-resolution
# maps with a tolerance of 1e-3 (observed: ~1e-6). The raw layer-resolution maps are compared too, through
# `get_cam_image` (the method its CAM variants override), fed with the activations and gradients its call recorded.
# It calls `model.eval()` and `loss.backward()` (filling `.grad`), so it gets a model of its own.

def _pgc_targets(targets): return [pytest.importorskip('pytorch_grad_cam.utils.model_targets').ClassifierOutputTarget(c) for c in targets]

@pytest.mark.parametrize('layer', ['layer4', 'layer3'])
def test_gradcam_matches_pytorch_grad_cam(xb, layer, targets):
    pgc = pytest.importorskip('pytorch_grad_cam')
    model = _model()
    target_layer = model.get_submodule(layer)[-1]  # its docs hook the last block; the same tensor as the stage's output
    with pgc.GradCAM(model=model, target_layers=[target_layer]) as cam:
        full = cam(input_tensor=xb, targets=_pgc_targets(targets))
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(xb, target_layer, _pgc_targets(targets), acts, grads)  # before its ReLU and normalization
    full, raw = torch.from_numpy(full), torch.from_numpy(raw)
    ours = heatmap(model, xb, targets=targets, layer=layer)  # default: upsampled to 96x96, min-max per map
    assert full.shape == ours.shape == (3, 96, 96)
    assert (ours - full).abs().max() < 1e-3
    _assert_close_rel(_ours_raw(model, xb, layer, targets), raw.clamp_min(0))
    _assert_close_rel(heatmap(model, xb, targets=targets, layer=layer, upsample=False, norm=None, relu=False), raw)


# ------------------------------------------------------------------------------------------------- CAM
def _cam_raw(model, xb, targets, relu):
    return heatmap(model, xb, targets=targets, method='cam', layer='layer4', upsample=False, norm=None, relu=relu)

def test_cam_matches_formula(model, xb, targets):
    "CAM (Zhou 2016) at layer4 is sum_k w[c,k] A_k with w the fc weights, for each sample's own class"
    acts = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__('a', o.detach()))
    try:
        with torch.no_grad(): model(xb)
    finally: h.remove()
    full = torch.einsum('ck,bkhw->bchw', model.fc.weight.detach(), acts['a'])  # every class's map
    ref = full[torch.arange(len(xb)), torch.tensor(targets)]
    signed = _cam_raw(model, xb, targets, relu=False)
    _assert_close_rel(signed, ref)
    _assert_close_rel(_cam_raw(model, xb, targets, relu=True), ref.relu())
    # For a GAP -> Linear head, Grad-CAM's weights are fc.weight / (h*w): the same map up to that factor
    hw = ref.shape[-2] * ref.shape[-1]
    _assert_close_rel(_ours_raw(model, xb, 'layer4', targets) * hw, ref.relu())

def test_cam_matches_torchcam(model, xb, targets):
    "CAM equals torchcam's CAM with `normalized=False`; torchcam's CAM applies no ReLU (unlike its docstring's formula)"
    methods = pytest.importorskip('torchcam.methods')
    with methods.CAM(model, 'layer4', 'fc') as extractor:
        with torch.no_grad(): model(xb)
        ref = extractor(targets, normalized=False)[0]
    assert (ref < 0).any()
    _assert_close_rel(_cam_raw(model, xb, targets, relu=False), ref)
    _assert_close_rel(_cam_raw(model, xb, targets, relu=True), ref.relu())


def test_references_leave_shared_model_clean(model):
    "The libraries used on the shared model left no hooks and no gradients behind (else later tests could be skewed)"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules())


def _conv_head_models():
    "A SqueezeNet (its head: dropout → 1×1 convolution → ReLU → global average pooling) and a head users write: 1×1 convolution → pooling → flatten"
    torch.manual_seed(0)
    sq = tvm.squeezenet1_1(weights=None, num_classes=10).eval()
    body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
    own = torch.nn.Sequential(body, torch.nn.Conv2d(32, 10, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return [(sq, 'features', 'classifier.1'), (own, '0', '1')]

@pytest.mark.parametrize('i', [0, 1], ids=['squeezenet', '1x1-conv-head'])
def test_cam_on_1x1_conv_head_matches_torchcam(xb, i):
    "CAM on a head of a 1×1 convolution and global pooling: the convolution's weights are the class weights, as torch-cam reads them"
    methods = pytest.importorskip('torchcam.methods')
    model, layer, fc = _conv_head_models()[i]
    with torch.no_grad(): tg = model(xb).argsort(1, descending=True)[:, :2]  # the two best-scoring classes of each sample
    ours = heatmap(model, xb, targets=tg, method='cam', layer=layer, upsample=False, norm=None, relu=False)
    for j in range(tg.shape[1]):
        with methods.CAM(model, layer, fc) as extractor:
            with torch.no_grad(): model(xb)
            ref = extractor(tg[:, j].tolist(), normalized=False)[0]
        assert (ref.flatten(1).std(1) > 0).all()  # maps that vary: not a vacuous comparison
        _assert_close_rel(ours[:, j], ref)
    # and it is the map whose mean gives the score: Grad-CAM ∝ CAM where no ReLU follows the 1×1 convolution
    if i == 1:
        g = heatmap(model, xb, targets=tg[:, 0], layer=layer, upsample=False, norm=None, relu=False)
        _assert_close_rel(g * ours.shape[-1] * ours.shape[-2], ours[:, 0])
