"""Beyond the CNN on a 64-pixel crop: vision transformers and every timm backbone, maps placed on the user's original
image through the learner's transforms, and `HeatmapCallback`."""
import warnings
import numpy as np, pytest, torch
from pathlib import Path
from PIL import Image
from torch import nn
from fastai.vision.all import (vision_learner, resnet18, ImageDataLoaders, Normalize, imagenet_stats, Resize, DataBlock, ImageBlock,
                               CategoryBlock, GrandparentSplitter, parent_label, get_image_files, aug_transforms, Learner, set_seed)
from fastai_heatmap.all import *
from conftest import model_state, assert_same_state, fast_options

timm = pytest.importorskip('timm')
warnings.filterwarnings('ignore', category=UserWarning)
LAYER_METHODS = method_names(uses_layer=True)


def _timm(name, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=3).eval()


@pytest.fixture(scope='module')
def x224(): return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize('name', LAYER_METHODS)
def test_every_layer_method_on_a_vit(x224, name):
    vit = _timm('vit_tiny_patch16_224')
    before = model_state(vit)
    try: e = explain(vit, x224, method=name, norm=None, **fast_options(name))
    except ValueError as err:  # CAM needs a pooling → Linear head after the layer: a ViT's is a norm and the class token
        assert name == 'cam' and "Use method='gradcam'" in str(err); return
    assert e.layer == 'blocks.11.norm1' and e.layer_size == ((224, 224) if name == 'guided_gradcam' else (14, 14))  # guided Grad-CAM's map is the input's
    assert e.maps.shape == (1, 224, 224) and torch.isfinite(e.maps).all()
    assert_same_state(before, model_state(vit))


@pytest.mark.parametrize('arch,layer,size', [('deit_tiny_distilled_patch16_224', 'blocks.11.norm1', (14, 14)),
                                             ('swin_tiny_patch4_window7_224', 'layers.3.blocks.1.norm1', (7, 7))])
@pytest.mark.parametrize('name', ['gradcam', 'gradcam++', 'hirescam', 'eigencam', 'ablationcam'])
def test_deit_and_swin(x224, arch, layer, size, name):
    "Prefix tokens (DeiT's class and distillation tokens) and channels-last stages (Swin): maps on the patch grid"
    if name == 'ablationcam' and arch.startswith('swin'): pytest.skip('one forward per channel of a Swin stage: slow on a CPU, and covered on DeiT')
    m = _timm(arch)
    e = explain(m, x224, method=name, norm=None)
    assert (e.layer, e.layer_size) == (layer, size) and torch.isfinite(e.maps).all() and e.maps.amax() > 0


def test_vit_gradcam_matches_pytorch_grad_cam(x224):
    "Grad-CAM on a ViT equals pytorch-grad-cam's with its documented reshape_transform (class token dropped, 14×14 grid)"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    ours = heatmap(_timm('vit_tiny_patch16_224'), x, targets=[0, 2])
    m = _timm('vit_tiny_patch16_224')
    def reshape_transform(t, h=14, w=14): return t[:, 1:, :].reshape(t.size(0), h, w, t.size(2)).transpose(2, 3).transpose(1, 2)
    with pgc.GradCAM(model=m, target_layers=[m.blocks[-1].norm1], reshape_transform=reshape_transform) as cam:
        ref = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(2)]))
    assert (ours - ref).abs().max() < 1e-3


@pytest.fixture(scope='module')
def dls224(demo):
    return ImageDataLoaders.from_folder(demo.dls.path, train='train', valid='valid', item_tfms=Resize(224), bs=8, num_workers=0,
                                       batch_tfms=Normalize.from_stats(*imagenet_stats))


@pytest.mark.parametrize('arch,layer', [('vit_tiny_patch16_224', '0.model.blocks.11.norm1'), ('convnext_atto', '0')])
def test_vision_learner_with_timm_names(demo, dls224, arch, layer):
    "fastai's `vision_learner` with a timm name: a transformer's last block, a timm CNN's body (TimmBody) as for any fastai model"
    learn = vision_learner(dls224, arch, pretrained=False)
    fns = demo.dls.valid_ds.items[:2]
    e = learn.explain(fns)
    assert e.layer == layer and e.maps.shape == (2, 224, 224) and torch.isfinite(e.maps).all()
    assert len(learn.show_cam(fns[0]).get_images()) == 2


# ---------------------------------------------------------------------------------------------- the original image
class BrightSpot(nn.Module):
    "Class 0's score is the sum of a 3×3 detector of bright pixels: its saliency is where the bright object is"
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        with torch.no_grad(): self.conv.weight.fill_(1 / 27)
    def forward(self, x):
        s = self.conv(x).relu().pow(2).sum((1, 2, 3))
        return torch.stack([s, -s], 1)


@pytest.mark.parametrize('method', ['squish', 'crop', 'pad'])
@pytest.mark.parametrize('batch', [False, True])
def test_map_lands_on_the_object(demo, tmp_path, method, batch):
    "A non-square image with a bright square: for each resize (as an item transform, or followed by a batch resize), the map's peak on the original is in the square"
    dblock = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'), get_y=parent_label,
                       item_tfms=Resize(96, method=method), batch_tfms=[*(aug_transforms(size=64) if batch else []), Normalize.from_stats(*imagenet_stats)])
    learn = Learner(dblock.dataloaders(demo.dls.path, bs=8, num_workers=0), BrightSpot(), loss_func=nn.CrossEntropyLoss())
    img = np.full((120, 200, 3), 60, np.uint8)
    box = (120, 40, 150, 70)  # x0, y0, x1, y1: inside what a centre crop keeps
    img[box[1]:box[3], box[0]:box[2]] = 255
    region = input_region(learn, (200, 120))
    assert region is not None
    ax = learn.show_cam(Image.fromarray(img), method='saliency', layer=None)
    drawn = ax.get_images()[1]
    x0, x1, y1, y0 = drawn.get_extent()
    m = drawn.get_array().data
    iy, ix = np.unravel_index(m.argmax(), m.shape)
    px, py = x0 + (ix + .5) * (x1 - x0) / m.shape[1], y0 + (iy + .5) * (y1 - y0) / m.shape[0]  # the peak, in the original's pixels
    assert box[0] - 2 <= px <= box[2] + 2 and box[1] - 2 <= py <= box[3] + 2, (px, py, region)
    assert ax.get_images()[0].get_array().shape[:2] == (120, 200)  # drawn on the original, at its own size


def test_original_false_and_fallback(demo, tmp_path):
    "original=False draws on what the model saw; so does a learner whose transforms are not a resize, crop or pad (a mirror), and it says why"
    from fastai.vision.all import Transform, PILImage
    fn = demo.dls.valid_ds.items[0]
    ax = demo.show_cam(fn, original=False)
    assert ax.get_images()[0].get_array().shape[:2] == (64, 64)
    class Mirror(Transform):
        order = 2  # after Resize, before ToTensor
        def encodes(self, x:PILImage): return x.transpose(Image.FLIP_LEFT_RIGHT)
    dblock = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'), get_y=parent_label,
                       item_tfms=[Resize(48), Mirror()], batch_tfms=Normalize.from_stats(*imagenet_stats))
    learn = Learner(dblock.dataloaders(demo.dls.path, bs=8, num_workers=0), BrightSpot(), loss_func=nn.CrossEntropyLoss())
    assert input_region(learn, (64, 64)) is None
    big = tmp_path/'big.png'
    Image.open(fn).resize((96, 80)).save(big)
    with pytest.warns(UserWarning, match='not a resize, crop or pad'): ax = learn.show_cam(big, method='saliency')
    assert ax.get_images()[0].get_array().shape[:2] == (48, 48)  # what the model saw, not the 96×80 original


# ---------------------------------------------------------------------------------------------- HeatmapCallback
def test_heatmap_callback_changes_nothing(demo):
    "Training with the callback gives the same weights as without; the model's flags are those of training"
    def train(cbs):
        set_seed(0)
        learn = vision_learner(digits_dls(demo.dls.path), resnet18, pretrained=False)  # fresh DataLoaders: their shuffling state is part of the run
        with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=cbs)
        return learn
    cb = HeatmapCallback(demo.dls.valid_ds.items[:3], method='gradcam++')
    a, b = train([]), train([cb])
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()): assert torch.equal(p, q)
    assert cb.history.shape == (2, 3, 64, 64) and cb.epochs == [0, 1]
    assert len([x for x in cb.show().axes if x.get_images()]) == 6
    with pytest.raises(ValueError, match='fit the learner'): HeatmapCallback([demo.dls.valid_ds.items[0]]).history
