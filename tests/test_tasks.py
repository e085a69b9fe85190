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
    if name == 'finercam': # defined by the classes nearest the target: class targets only, said clearly
        with pytest.raises(ValueError, match='pass `targets=`, not `score=`'): _run(model, x, name, score=lambda o: o[:, 3])
        return
    ref = _run(model, x, name, targets=3, relu=False)
    e = _run(model, x, name, score=lambda o: o[:, 3], relu=False)
    close_to(e.maps, ref.maps, 1e-5)
    assert (e.targets == -1).all() and e.maps.shape == ref.maps.shape


@pytest.mark.parametrize('name', METHODS)
def test_score_of_a_logit_difference(name):
    "A logit difference: for the methods linear in the score (gradients at a layer or the input, CAM), the map is the difference of the classes' maps"
    model, x = _small(), _x()
    if name == 'finercam': return # class targets only (test above)
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


# ------------------------------------------------------------------------------------------------ segmentation
from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, PILImage, PILMask, unet_learner, resnet18, RandomSplitter,
                               RegressionBlock, vision_learner, MSELossFlat)
from fastai_heatmap.core import default_layer
import fastai_heatmap.learner  # noqa: F401 (the Learner patches)
from fastai_heatmap.learner import task_of

CODES = ['background', 'square', 'disc']

def shapes_data(n=8, size=64, seed=0):
    "Generated images, each with a bright square and a dark disc on noise, and their masks (0 background, 1 square, 2 disc)"
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, masks = [], []
    for _ in range(n):
        img = rng.integers(60, 140, (size, size, 3)).astype(np.uint8)
        m = np.zeros((size, size), np.uint8)
        x0, y0, s = *rng.integers(4, size // 2, 2), int(rng.integers(10, 20))
        m[y0:y0+s, x0:x0+s] = 1
        cx, cy, r = *rng.integers(size // 2, size - 8, 2), int(rng.integers(5, 9))
        m[(xx - cx)**2 + (yy - cy)**2 <= r*r] = 2
        img[m == 1], img[m == 2] = (230, 220, 40), (20, 30, 120)
        imgs.append(img); masks.append(m)
    return np.stack(imgs), np.stack(masks)


@pytest.fixture(scope='module')
def seg():
    "A fastai `unet_learner(resnet18)` with seeded random (untrained) weights on the generated shapes"
    imgs, masks = shapes_data()
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=CODES)), get_x=lambda i: PILImage.create(imgs[i]),
                       get_y=lambda i: PILMask.create(masks[i]), splitter=RandomSplitter(seed=0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = unet_learner(dblock.dataloaders(range(8), bs=4, num_workers=0), resnet18, pretrained=False, n_out=3)
    learn.model.eval()
    return learn, imgs, masks


def _batch(learn, imgs):
    return learn.dls.test_dl([PILImage.create(i) for i in imgs], num_workers=0).one_batch()[0].as_subclass(torch.Tensor)


def corr(a, b): return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def test_segmentation_task_and_default_layer(seg):
    learn, imgs, _ = seg
    assert task_of(learn) == 'segmentation'
    assert default_layer(learn.model, torch.zeros(1, 3, 224, 224)) == 'layers.0.7' # the encoder's last stage
    assert default_layer(learn.model, torch.zeros(1, 3, 64, 64)) == 'layers.0.6' # ... the last with maps of at least 4×4


def test_segmentation_gradcam_equals_pytorch_grad_cam(seg):
    "learn.heatmap(img, targets=class) is pytorch-grad-cam's GradCAM with SemanticSegmentationTarget(class, pixels predicted as it), at the default layer"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    learn, imgs, _ = seg
    xb = _batch(learn, imgs[:3])
    with torch.no_grad(): pred = learn.model(xb).argmax(1)
    checked = 0
    for c, name in enumerate(CODES):
        for i in range(len(xb)):
            mask = pred[i] == c
            if not mask.any(): continue
            ours = learn.heatmap(PILImage.create(imgs[i]), targets=name, upsample=False, norm=None, relu=False)
            e = learn.explain(PILImage.create(imgs[i]), targets=name)
            assert e.layer == 'layers.0.6' and torch.equal(e.regions[0].cpu(), mask)
            with pgc.GradCAM(model=learn.model, target_layers=[learn.model.get_submodule(e.layer)]) as cam:
                cam(input_tensor=xb[i:i+1], targets=[SemanticSegmentationTarget(c, mask.float().numpy())])
                acts, grads = (o[0].numpy() for o in (cam.activations_and_grads.activations, cam.activations_and_grads.gradients))
                ref = cam.get_cam_image(xb[i:i+1], None, None, acts, grads)
            learn.model.zero_grad(set_to_none=True)
            assert np.abs(ref).max() > 0
            assert corr(ours, ref) >= 0.999, (name, i, corr(ours, ref))
            checked += 1
    assert checked >= 3


def test_segmentation_regions(seg):
    "region=: a box and a boolean mask are the class's score summed over those pixels; every method takes it; an empty region is an error"
    learn, imgs, _ = seg
    img = PILImage.create(imgs[0])
    xb = _batch(learn, imgs[:1])
    box = (10, 5, 40, 30)
    m = torch.zeros(64, 64, dtype=torch.bool); m[5:30, 10:40] = True
    a = learn.heatmap(img, targets='square', region=box, norm=None, relu=False)
    b = learn.heatmap(img, targets='square', region=m, norm=None, relu=False)
    c = heatmap(learn.model, xb, score=lambda o: (o[:, 1] * m).sum((1, 2)), layer='layers.0.6', norm=None, relu=False)
    close_to(a, b); close_to(a, c)
    for name in ('scorecam', 'occlusion', 'saliency', 'ablationcam'):
        ref = explain(learn.model, xb, score=lambda o: (o[:, 1] * m).sum((1, 2)), method=name, norm=None, relu=False, bar=False, **fast_options(name))
        e = explain(learn.model, xb, targets=1, region=box, method=name, norm=None, relu=False, bar=False, **fast_options(name))
        close_to(e.maps, ref.maps, 1e-4)
    with pytest.raises(ValueError, match='should be a boolean mask'): learn.heatmap(img, targets='square', region=torch.zeros(32, 32, dtype=torch.bool))
    with pytest.raises(TypeError, match='boolean mask'): learn.heatmap(img, targets='square', region=torch.zeros(64, 64))
    with pytest.raises(ValueError, match='selects no pixel'): learn.heatmap(img, targets='square', region=torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'0 ≤ x0 < x1 ≤ 64'): learn.heatmap(img, targets='square', region=(10, 10, 80, 20))
    with pytest.raises(ValueError, match='CAM|cam'): learn.heatmap(img, targets='square', method='cam')
    with torch.no_grad(): absent = [c for c in range(3) if not (learn.model(xb).argmax(1) == c).any()]
    if absent:
        with pytest.raises(ValueError, match='predicted at no pixel'): learn.heatmap(img, targets=absent[0])


def test_segmentation_show_cam(seg, tmp_path):
    "image | predicted mask | heatmap, with the class name"
    import matplotlib.pyplot as plt
    learn, imgs, _ = seg
    with torch.no_grad(): pred = learn.model(_batch(learn, imgs[:1])).argmax(1)[0]
    name = CODES[int(pred.flatten().mode().values)]
    axs = learn.show_cam(PILImage.create(imgs[0]), target=name)
    assert len(axs) == 3 and axs[1].get_title().startswith('predicted mask') and f'map for {name}' in axs[2].get_title()
    axs[0].figure.savefig(tmp_path/'seg.png'); plt.close('all')


# ------------------------------------------------------------------------------------------------ regression
@pytest.fixture(scope='module')
def reg():
    "A tiny seeded (untrained) CNN regressing 2 numbers (say an object's position) from the generated images"
    from fastai.learner import Learner
    imgs, masks = shapes_data()
    ys = np.stack([np.argwhere(m == 1).mean(0) / 64 for m in masks]).astype(np.float32)
    dblock = DataBlock(blocks=(ImageBlock, RegressionBlock(n_out=2)), get_x=lambda i: PILImage.create(imgs[i]), get_y=lambda i: ys[i], splitter=RandomSplitter(seed=0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    learn = Learner(dblock.dataloaders(range(8), bs=4, num_workers=0), model, loss_func=MSELossFlat())
    return learn, imgs


def test_regression_learner(reg):
    "One output explained as is (no softmax on any path), `targets=i` picks it, `sign=-1` explains what lowers it"
    learn, imgs = reg
    assert task_of(learn) == 'regression'
    img, xb = PILImage.create(imgs[0]), _batch(learn, imgs[:1])
    for name in ('gradcam', 'saliency', 'occlusion', 'scorecam'):
        kw = dict(norm=None, relu=False, **fast_options(name))
        ours = learn.explain(img, targets=1, method=name, **kw)
        ref = explain(learn.model, xb, score=lambda o: o[:, 1], act=lambda o: o, method=name, bar=False, **kw) # raw outputs, no softmax
        close_to(ours.maps, ref.maps, 1e-4)
        low = learn.explain(img, targets=1, sign=-1, method=name, **kw)
        close_to(low.maps, -ours.maps, 1e-4)
        assert low.targets.tolist() == [1] and low.negative.tolist() == [True]
    with pytest.raises(ValueError, match='has 2 outputs: pass `targets=i`'): learn.heatmap(img)
    with pytest.raises(ValueError, match='`sign`'): learn.heatmap(img, targets=0, sign=2)
    ax = learn.show_cam(img, target=1)
    assert ax.get_title().startswith('prediction ') and 'output 1' in ax.get_title()
    import matplotlib.pyplot as plt; plt.close('all')
