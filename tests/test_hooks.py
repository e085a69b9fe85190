"""Issue 21: Grad-CAM at a layer whose output is also read through another forward hook (fastai `DynamicUnet`'s skip
connections, user hooks) gets the gradient of every path that reads it, equal to pytorch-grad-cam's full backward pass.

The seg models explain the score pytorch-grad-cam's `SemanticSegmentationTarget(c, mask)` defines, Σ_{mask} y_c(i,j), through
a wrapper whose output is that sum per class (the plain classifier path of `heatmap`), so these tests need nothing else.
"""
import warnings
import numpy as np, pytest, torch
from torch import nn
from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, PILImage, PILMask, unet_learner, resnet18, hook_output,
                               RandomSplitter)
from fastai_heatmap.core import heatmap
from fastai_heatmap.hooks import ActivationHook
from conftest import model_state, assert_same_state

pgc = pytest.importorskip('pytorch_grad_cam')
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget


class RegionSum(nn.Module):
    "Σ over `mask` of each class's logits: (B, C, H, W) → (B, C), pytorch-grad-cam's SemanticSegmentationTarget as a classifier"
    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask
    def forward(self, x): return (self.model(x) * self.mask).sum((2, 3))


def pgc_raw(model, layer, x, targets):
    "pytorch-grad-cam's Grad-CAM before its ReLU and normalization (full backward, activations and gradients from its hooks)"
    with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
        cam(input_tensor=x, targets=targets)
        acts, grads = (o[0].numpy() for o in (cam.activations_and_grads.activations, cam.activations_and_grads.gradients))
        return torch.from_numpy(cam.get_cam_image(x, layer, targets, acts, grads))


def corr(a, b): return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


@pytest.fixture(scope='module')
def unet():
    "A fastai `unet_learner(resnet18)` with seeded random weights, on a few random 64×64 images with random masks"
    rng = np.random.default_rng(0)
    imgs, masks = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8), rng.integers(0, 3, (8, 64, 64), dtype=np.uint8)
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['a', 'b', 'c'])), get_x=lambda i: PILImage.create(imgs[i]),
                       get_y=lambda i: PILMask.create(masks[i]), splitter=RandomSplitter(seed=0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = unet_learner(dblock.dataloaders(range(8), bs=4, num_workers=0), resnet18, pretrained=False, n_out=3)
    return learn.model.eval()


def _seg_case(model, seed=1):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): pred = model(x).argmax(1)
    c = int(pred.flatten().mode().values)
    return x, c, (pred == c).float()


@pytest.mark.parametrize('name', ['layers.0.4', 'layers.0.5', 'layers.0.6'])
def test_unet_skip_connection_gradcam_matches_pytorch_grad_cam(unet, name):
    "At encoder layers whose output DynamicUnet's skip connections read by hooks: the gradient of both paths, as a full backward"
    layer = unet.get_submodule(name)
    assert len(layer._forward_hooks) == 1, "the fixture's premise: DynamicUnet hooks this layer for a skip connection"
    x, c, mask = _seg_case(unet)
    for i in range(len(x)):
        ours = heatmap(RegionSum(unet, mask[i]), x[i:i+1], targets=c, layer='model.' + name, upsample=False, norm=None, relu=False)
        ref = pgc_raw(unet, layer, x[i:i+1], [SemanticSegmentationTarget(c, mask[i].numpy())])
        assert ref.abs().max() > 0
        assert corr(ours, ref) >= 0.999, (name, i, corr(ours, ref))
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    unet.zero_grad(set_to_none=True) # pytorch-grad-cam's backward filled .grad
    before = model_state(unet)
    heatmap(RegionSum(unet, mask[0]), x[:1], targets=c, layer='model.' + name)
    assert_same_state(before, model_state(unet)) # DynamicUnet's own hooks are all that is left, no .grad


class UserSkip(nn.Module):
    "A user's forward hook stores the output of `body[2]` (also `body`'s output); the forward adds it back after more layers"
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2))
        self.head = nn.Linear(8, 5)
        self.kept = {}
        self.body[2].register_forward_hook(lambda m, i, o: self.kept.__setitem__('skip', o))
    def forward(self, x):
        y = self.mid(self.body(x)) + self.kept['skip']
        return self.head(y.relu().mean((2, 3)))


@pytest.mark.parametrize('name', ['body.2', 'body'])
def test_user_hook_gradcam_matches_pytorch_grad_cam(name):
    "A user hook that stores a layer's output, added later: at the layer itself (prepend) and at the Sequential around it (from its input)"
    torch.manual_seed(0)
    model = UserSkip().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): tg = model(x).argmax(1)
    layer = model.get_submodule(name)
    ours = heatmap(model, x, targets=tg, layer=name, upsample=False, norm=None, relu=False)
    ref = pgc_raw(model, layer, x, [pgc.utils.model_targets.ClassifierOutputTarget(int(t)) for t in tg])
    assert corr(ours, ref) >= 0.999, corr(ours, ref)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with ActivationHook(layer, grad=True) as h:
        with torch.no_grad(): model(x)
    assert h.from_input == (name == 'body') # the hook on body.2 sees body's output before any hook of body's own


def test_head_only_where_nothing_else_reads_the_layer():
    "No other hook on the layer or inside it: the graph starts at the layer's output, nothing before it is recorded"
    from torchvision.models import resnet18 as tv_resnet18
    model = tv_resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with ActivationHook(model.layer4, grad=True) as h:
        with torch.no_grad(): out = model(x)
    assert not h.from_input and h.stored.is_leaf and out.requires_grad
    with hook_output(model.layer4, detach=False) as other, ActivationHook(model.layer4, grad=True) as h:
        with torch.no_grad(): out = model(x)
    assert not h.from_input and h.stored.is_leaf and other.stored.requires_grad # another hook on the layer itself: still head-only
