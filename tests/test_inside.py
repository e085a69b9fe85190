"""What the layers learned: filter and feature-map tiles equal the weights and activations, activation maximization raises
its objective and leaves the model exactly as it was, show_conv equals a convolution computed by hand, show_methods equals
learn.heatmap; on the demo learner and on timm CNNs; bad input."""
import warnings
import numpy as np, pytest, torch
import matplotlib.pyplot as plt
from PIL import Image
from torch import nn
from fastai.vision.all import vision_learner, Learner, CrossEntropyLossFlat, TensorImage
from fastai_heatmap.all import *
from conftest import model_state, assert_same_state


@pytest.fixture(scope='module')
def timm_learn(demo):
    "A timm resnet18 through `vision_learner` (a `TimmBody`), untrained"
    pytest.importorskip('timm')
    return vision_learner(demo.dls, 'resnet18', pretrained=False)


@pytest.fixture(scope='module')
def timm_plain(demo):
    "A timm resnet18 created by timm itself, wrapped in a plain `Learner`"
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    return Learner(demo.dls, timm.create_model('resnet18', pretrained=False, num_classes=4), loss_func=CrossEntropyLossFlat())


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


def _arrays(fig): return [np.asarray(a.get_images()[0].get_array()) for a in fig.axes if a.get_images()]
def _titles(fig): return [a.get_title() for a in fig.axes if a.get_images()]


def _output(model, name, xb):
    "The output of layer `name` for `xb`, by a plain forward hook that copies it"
    store = {}
    def keep(m, i, o): store['o'] = o.detach().clone() # returns None: the model's own output goes on
    h = model.get_submodule(name).register_forward_hook(keep)
    was = model.training
    try:
        with torch.no_grad(): model.eval()(xb)
    finally: h.remove(); model.train(was)
    return store['o']


@pytest.mark.parametrize('which', ['demo', 'timm_learn', 'timm_plain'])
def test_filter_tiles_are_the_weights(which, request):
    learn = request.getfixturevalue(which)
    first = conv_layers(learn.model)[0]
    w = learn.model.get_submodule(first).weight.detach()
    fig = learn.show_filters()
    tiles = _arrays(fig)
    assert len(tiles) == min(64, len(w))
    assert _titles(fig) == [str(i) for i in range(len(tiles))]
    for i, t in enumerate(tiles): # the first layer sees RGB: each kernel scaled to [0, 1]
        k = w[i]
        np.testing.assert_allclose(t, ((k - k.min()) / (k.max() - k.min())).permute(1, 2, 0).numpy(), atol=1e-6)
    deep = conv_layers(learn.model)[5]
    w = learn.model.get_submodule(deep).weight.detach()
    fig = learn.show_filters(deep, max_n=12, in_channel=2)
    tiles = _arrays(fig)
    assert len(tiles) == 12
    for i, t in enumerate(tiles): np.testing.assert_array_equal(t, w[i, 2].numpy())
    assert fig.axes[0].get_images()[0].get_clim() == pytest.approx((-np.abs(w[:12, 2]).max().item(), np.abs(w[:12, 2]).max().item()))


@pytest.mark.parametrize('which,layer', [('demo', '0.4'), ('demo', '0.1'), ('timm_learn', '0.model.layer2'), ('timm_plain', 'layer1')])
def test_feature_map_tiles_are_the_activations(which, layer, request):
    learn = request.getfixturevalue(which)
    fn = learn.dls.valid_ds.items[7]
    xb = learn.dls.test_dl([fn]).one_batch()[0]
    a = _output(learn.model, layer, xb)[0] # '0.1' is followed by an in-place ReLU: the tiles must be the BatchNorm's own output
    before = model_state(learn.model)
    fig = learn.show_feature_maps(fn, layer, max_n=20)
    assert_same_state(before, model_state(learn.model))
    chans = [int(t) for t in _titles(fig)]
    assert len(chans) == 20 and chans == a.mean((1, 2)).argsort(descending=True)[:20].tolist()
    for c, t in zip(chans, _arrays(fig)): np.testing.assert_allclose(t, a[c].numpy(), rtol=1e-5, atol=1e-6)
    if layer == '0.1': assert a.min() < 0


def test_feature_maps_default_layer(demo, timm_learn):
    fn = demo.dls.valid_ds.items[0]
    assert demo.feature_maps(fn)[1] == '0.5' # the deepest with maps of at least 8×8 at 64 px
    a, name = timm_learn.feature_maps(fn)
    assert min(a.shape[-2:]) >= 8


def test_show_conv_matches_a_hand_computed_convolution(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 7, 9, generator=g)
    k = torch.tensor([[1., -2, 0.5], [0, 3, -1], [2, 1, -1]])
    def by_hand(x, k, pad=0, stride=1):
        xp = torch.nn.functional.pad(x, (pad,)*4)
        H, W = (xp.shape[1] - 3) // stride + 1, (xp.shape[2] - 3) // stride + 1
        out = np.zeros((H, W))
        for i in range(H):
            for j in range(W):
                out[i, j] = sum(float(xp[c, i*stride + a, j*stride + b]) * float(k[a, b]) for c in range(xp.shape[0]) for a in range(3) for b in range(3))
        return out
    for pad, stride in ((0, 1), (1, 1), (1, 2)):
        axs = show_conv(x, k, padding=pad, stride=stride)
        np.testing.assert_allclose(np.asarray(axs[1].get_images()[0].get_array()), by_hand(x, k, pad, stride), rtol=1e-5, atol=1e-5)
    for name in conv_kernels: # every named kernel, on a file, as uint8 pixels
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path/'x.png')
        px = torch.from_numpy(np.array(Image.open(tmp_path/'x.png'))).permute(2, 0, 1).float() / 255
        axs = show_conv(tmp_path/'x.png', name)
        np.testing.assert_allclose(np.asarray(axs[1].get_images()[0].get_array()), by_hand(px, conv_kernels[name]), rtol=1e-4, atol=1e-4)
    grey = Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8))
    axs = show_conv(grey, 'sobel_y')
    np.testing.assert_allclose(np.asarray(axs[1].get_images()[0].get_array()), by_hand(torch.from_numpy(np.array(grey))[None].float() / 255, conv_kernels['sobel_y']), rtol=1e-4, atol=1e-4)


def _noise(n, seed=0): return 0.2 * torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('which', ['imagenet', 'timm_plain'])
def test_activation_maximization_raises_the_score_and_leaves_the_model(which, request):
    "Raising the score needs a trained network: the ImageNet-pretrained weights, the same on every machine (issue 15 §1), and an untrained timm model"
    learn = request.getfixturevalue(which)
    model = learn.model
    # a model in train mode, with some frozen parameters and some .grad already there: all of it must come back as it was
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    for p in params[-4:]: p.grad = torch.randn_like(p)
    try:
        before = model_state(model)
        rng = torch.get_rng_state()
        # the pretrained network with the defaults and with Lucid's regularizers; the untrained timm model without regularizers:
        # its random features depend on exact pixel positions (jitter undoes each step) and its logits barely move
        kws = [{}, dict(param='fourier', scale=(0.9, 1.1), rotate=10, jitter=8, tv_weight=0, lr=0.05, lo=-2., hi=2.5)] if which == 'imagenet' else [dict(jitter=0, tv_weight=0)]
        for kw in kws:
            x, start, final = optimize_input(model, _noise(4), torch.arange(4), steps=32, **kw)
            assert_same_state(before, model_state(model))
            assert torch.equal(torch.get_rng_state(), rng)
            assert (final > start).all(), (kw, start, final)
            with torch.no_grad(), eval_mode(model): assert torch.allclose(model(x).gather(1, torch.arange(4)[:, None])[:, 0], final, atol=1e-3)
            lay = conv_layers(model)[-1]  # the two channels that fire most on these images, picked from the model
            x0 = _noise(2)
            ch, _ = most_active_channels(model, x0, lay, k=2)
            x, start, final = optimize_input(model, x0, layer=lay, channel=ch.tolist(), steps=24, **kw)
            assert (final > start).all(), (kw, start, final)
        imgs = learn.max_activation(list(learn.dls.vocab[:2]), size=64, steps=4)
        assert imgs.shape == (2, 3, 64, 64) and isinstance(imgs, ActivationImages)
        assert_same_state(before, model_state(model))
    finally:
        params[0].requires_grad_(True)
        for p in params: p.grad = None
        model.eval()


def test_max_activation_gives_what_the_model_takes_for_the_class(imagenet):
    """On the pretrained network, with Lucid's regularizers: the decoded images, encoded again, are taken for their classes (top-1).
    (Optimized pixels at the defaults are not: rounded to bytes and without transformation robustness, their high frequencies lose the class.)"""
    kw = dict(param='fourier', scale=(0.9, 1.1), rotate=10, jitter=8, tv_weight=0, lr=0.05)
    names = ['goldfish', 'espresso', 'daisy']
    imgs = imagenet.max_activation(names, size=96, steps=48, **kw)
    enc = imagenet.dls.valid.after_batch(TensorImage(imgs.round().byte()))
    with torch.no_grad(): p = imagenet.model.eval()(enc).softmax(1)
    want = torch.tensor([imagenet.dls.vocab.o2i[o] for o in names])
    assert (p.argmax(1) == want).all() and (p[torch.arange(3), want] > 0.5).all(), p.max(1)
    assert imgs.min() >= 0 and imgs.max() <= 255 # kept within real pixels
    one = imagenet.max_activation('goldfish', size=64, steps=2, show=True)
    assert one.shape == (3, 64, 64) and one.fig is not None
    assert plt.gcf().axes[0].get_title().startswith('goldfish\np = ')
    assert '\n' not in repr(one) and repr(one).startswith('ActivationImages((3, 64, 64)') # reads in a line (issue 20)
    plt.close('all')


class _Linear(nn.Module):
    "Hand-set: each class's logit is a fixed weighted sum of the pixels, with every weight of magnitude ≥ 0.5 (no gradient near 0)"
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.rand(4, 3, 64, 64, generator=g) + 0.5
        self.w = nn.Parameter(w * torch.where(torch.rand(w.shape, generator=g) < 0.5, -1., 1.))
    def forward(self, x): return torch.einsum('bchw,kchw->bk', x, self.w) / 100


def test_activation_maximization_is_batched(demo):
    """Several targets at once give each image what it gets alone (the same start and the same jitter): exactly where the
    optimization is well conditioned (a hand-set model whose gradients are far from 0), and on the demo model through the
    objective's gradient. Adam's step is about lr·g/|g| per pixel, so where a trained model's gradient is ~1e-8 of its largest
    the sign of float rounding is a full step and trajectories drift apart after a few steps: that is Adam's conditioning, not batching"""
    x0, t = _noise(3, seed=1), torch.tensor([0, 2, 3])
    lin = _Linear()
    both, _, f = optimize_input(lin, x0, t, steps=6)
    one, _, f1 = optimize_input(lin, x0[1:2], t[1:2], steps=6)
    torch.testing.assert_close(both[1:2], one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f[1:2], f1, rtol=1e-5, atol=1e-6)
    model = demo.model.eval()
    def grad(x, t):
        x = x.clone().requires_grad_()
        return torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)[0]
    gb, g1 = grad(x0, t), grad(x0[1:2], t[1:2])
    torch.testing.assert_close(gb[1:2], g1, rtol=1e-4, atol=1e-6 * g1.abs().max().item())


def test_lucid_options_are_batched():
    """Lucid's options (the Fourier image, random scale and rotation) change nothing between images: several at once give each
    what it gets alone (the transformations are drawn once per step for the batch, the spectra are per image), on the hand-set model"""
    x0, t = _noise(3, seed=1), torch.tensor([0, 2, 3])
    kw = dict(param='fourier', scale=(0.9, 1.1), rotate=10, jitter=8, tv_weight=0.5, lr=0.05, lo=-2., hi=2.)
    lin = _Linear()
    both, s, f = optimize_input(lin, x0, t, steps=6, **kw)
    one, s1, f1 = optimize_input(lin, x0[1:2], t[1:2], steps=6, **kw)
    torch.testing.assert_close(both[1:2], one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f[1:2], f1, rtol=1e-5, atol=1e-5)
    assert (f > s).all() and both.min() >= -2 and both.max() <= 2 # raised, and in range by the sigmoid


def test_show_methods_equals_learn_heatmap(demo, timm_plain):
    fn = demo.dls.valid_ds.items[3]
    for learn, layer in ((demo, None), (demo, '0.5'), (timm_plain, 'layer3')):
        ms = ['gradcam', 'layercam', 'saliency', get_method('integrated_gradients', steps=8)]
        fig = learn.show_methods(fn, ms, target='4', layer=layer)
        cells = [a for a in fig.axes if a.get_images()]
        assert len(cells) == 5 and len(cells[0].get_images()) == 2
        for ax, m in zip(cells[1:], ms):
            name = get_method(m).name
            assert ax.get_title().split('\n')[0] == name
            cost = list_methods().set_index('name').loc[name, 'cost']
            assert ' '.join(ax.get_title().split('\n')[1:]) == cost
            kw = dict(layer=layer) if get_method(m).uses_layer else {}
            ref = learn.heatmap(fn, '4', method=m, **kw)[0]
            np.testing.assert_allclose(np.asarray(ax.get_images()[1].get_array()), ref.numpy(), atol=1e-5)


def test_nothing_leaves_hooks_or_changes_the_model(demo):
    fn = demo.dls.valid_ds.items[0]
    before = model_state(demo.model)
    demo.show_filters(); demo.show_feature_maps(fn, '0.6'); demo.max_activation('0', steps=2); demo.show_methods(fn, ['gradcam', 'guided'])
    for bad in (lambda: demo.show_feature_maps(fn, '1.4'), lambda: demo.max_activation(layer='0.6', channel=999, steps=2)):
        with pytest.raises(ValueError): bad()
    assert_same_state(before, model_state(demo.model))


@pytest.mark.parametrize('call,exc,msg', [
    (lambda l: l.show_filters('0.2'), ValueError, "Layer '0.2' (ReLU) has no convolution kernels"),
    (lambda l: l.show_filters('0.5'), ValueError, "The convolutions inside it are '0.5.0.conv1'"),
    (lambda l: l.show_filters('1.8'), ValueError, "Layer '1.8' (Linear) has no convolution kernels"),
    (lambda l: l.show_filters('0.55'), ValueError, "no layer named '0.55'"),
    (lambda l: l.show_filters(max_n=0), ValueError, '`max_n` should be an int ≥ 1'),
    (lambda l: l.show_filters(in_channel=3), ValueError, 'an int from 0 to 2'),
    (lambda l: l.show_feature_maps(l.dls.valid_ds.items[0], '1.4'), ValueError, 'not feature maps'),
    (lambda l: l.show_feature_maps(l.dls.valid_ds.items[:2]), TypeError, 'one item'),
    (lambda l: l.max_activation('9'), ValueError, "Unknown label '9'"),
    (lambda l: l.max_activation('7', steps=0), ValueError, '`steps` should be an int ≥ 1'),
    (lambda l: l.max_activation('7', steps=2.5), ValueError, '`steps` should be an int ≥ 1'),
    (lambda l: l.max_activation('7', lr=-1), ValueError, '`lr` should be a number > 0'),
    (lambda l: l.max_activation('7', jitter=-1), ValueError, '`jitter` should be an int ≥ 0'),
    (lambda l: l.max_activation('7', tv_weight=-1), ValueError, '`tv_weight` should be a number ≥ 0'),
    (lambda l: l.max_activation(), ValueError, 'Pass a class to excite'),
    (lambda l: l.max_activation([]), ValueError, 'Nothing to excite'),
    (lambda l: l.max_activation('7', channel=1), ValueError, 'not both'),
    (lambda l: l.max_activation(layer='0.6', channel=256, steps=1), ValueError, "not a channel of layer '0.6', which has 256"),
    (lambda l: l.max_activation('7', size=(0, 4)), ValueError, '`size` should be an int or (H, W)'),
    (lambda l: l.show_methods(l.dls.valid_ds.items[0], 'gradcam'), TypeError, 'list of method names'),
    (lambda l: l.show_methods(l.dls.valid_ds.items[0], ['gradcm']), ValueError, "Did you mean 'gradcam'"),
])
def test_bad_input(demo, call, exc, msg):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(exc) as e: call(demo)
    assert msg in str(e.value), str(e.value)


def test_class_index_out_of_range(demo):
    "9 is neither a class index of the 4 classes nor a label ('0', '1', '4', '7'): the engine's out-of-range error, no warning first"
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        with pytest.raises(IndexError, match='out of range'): demo.max_activation(9, steps=1)
    with pytest.raises(IndexError, match="pass it as a string, '7'"): demo.max_activation(7, steps=1)


def test_show_conv_bad_input():
    for bad, msg in (('nope', "Unknown kernel 'nope'"), (torch.ones(3), 'should be 2-D')):
        with pytest.raises(ValueError, match=msg): show_conv(torch.rand(3, 8, 8), bad)
    with pytest.raises(FileNotFoundError): show_conv('missing.png')
    with pytest.raises(ValueError, match='one image'): show_conv(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match='an image file'): show_conv(3)
