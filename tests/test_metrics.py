"""Can the map be trusted: the deletion/insertion AUC (hand-computed cases, batching, the digit's box against random maps on
the demo learner), Spearman's rank correlation against scipy, the cascading randomization test (Grad-CAM loses the
trained model's map, guided backpropagation keeps it; the learner's model untouched), the moved metrics, timm CNNs, bad input."""
import numpy as np, pandas as pd, pytest, torch
import matplotlib.pyplot as plt
from torch import nn
from fastai.vision.all import vision_learner, Learner, CrossEntropyLossFlat
from fastai_heatmap.all import *
import fastai_heatmap.metrics as metrics, fastai_heatmap.interpret as interpret, fastai_heatmap.data as data
from conftest import model_state, assert_same_state


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close('all')


@pytest.fixture(scope='module')
def timm_plain(demo):
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    return Learner(demo.dls, timm.create_model('resnet18', pretrained=False, num_classes=4), loss_func=CrossEntropyLossFlat())


def test_metrics_live_in_one_place():
    assert interpret.border_mass is metrics.border_mass
    assert not hasattr(data, 'pointing_game')
    assert {'pointing_game', 'border_mass', 'heatmap_faithfulness', 'rank_correlation'} <= set(metrics.__all__)


class Linear2(nn.Module):
    "Logits (Σ w·x, 0) over a 1×2×2 image: each pixel's weight is its importance"
    def __init__(self, w): super().__init__(); self.w = nn.Parameter(torch.tensor(w).view(1, 1, 2, 2))
    def forward(self, x): return torch.stack([(self.w * x).flatten(1).sum(1), torch.zeros(len(x))], 1)


def test_deletion_and_insertion_by_hand():
    m = Linear2([4., 3., 2., 1.])
    x = torch.ones(1, 1, 2, 2)
    sig = lambda v: torch.tensor(float(v)).sigmoid().item()
    order = torch.tensor([[[4., 3.], [2., 1.]]]) # the true order of importance
    c = deletion_curves(m, x, order, steps=4)[0]
    np.testing.assert_allclose(c.numpy(), [sig(10), sig(6), sig(3), sig(1), sig(0)], rtol=1e-6)
    c_rev = deletion_curves(m, x, -order, steps=4)[0]
    np.testing.assert_allclose(c_rev.numpy(), [sig(10), sig(9), sig(7), sig(4), sig(0)], rtol=1e-6)
    assert curve_auc(c) < curve_auc(c_rev)
    ins = deletion_curves(m, x, order, steps=4, metric='insertion', substrate=0.)[0]
    np.testing.assert_allclose(ins.numpy(), [sig(0), sig(4), sig(7), sig(9), sig(10)], rtol=1e-6)
    assert curve_auc(ins) > curve_auc(deletion_curves(m, x, -order, steps=4, metric='insertion', substrate=0.)[0])
    # fewer steps than pixels: pixels changed at each step are round(k·HW/steps)
    np.testing.assert_allclose(deletion_curves(m, x, order, steps=2)[0].numpy(), [sig(10), sig(3), sig(0)], rtol=1e-6)
    # a class other than the prediction, and a substrate value
    np.testing.assert_allclose(deletion_curves(m, x, order, targets=1, steps=1, substrate=-1.)[0].numpy(), [1 - sig(10), 1 - sig(-10)], rtol=1e-3, atol=1e-7)
    # the trapezoid rule
    assert curve_auc(torch.tensor([1., 0.])) == pytest.approx(0.5)
    assert curve_auc(torch.tensor([1., 1., 0.])) == pytest.approx(0.75)


def test_ties_are_broken_at_random_not_by_position():
    m = Linear2([4., 3., 2., 1.])
    x = torch.ones(1, 1, 2, 2)
    flat = torch.zeros(1, 2, 2) # every pixel tied
    firsts = {deletion_curves(m, x, flat, steps=4, seed=s)[0, 1].item() for s in range(12)} # the first pixel deleted
    assert len(firsts) > 1
    assert torch.equal(deletion_curves(m, x, flat, steps=4), deletion_curves(m, x, flat, steps=4)) # seeded
    xs = torch.ones(3, 1, 2, 2)
    assert torch.equal(deletion_curves(m, xs, flat.expand(3, 2, 2), steps=4)[1], deletion_curves(m, x, flat, steps=4)[0]) # alone or in a batch


class Centre(nn.Module):
    "Logits (10·x[0, 16, 16], 0), and no parameters"
    def forward(self, x): return torch.stack([10 * x[:, 0, 16, 16], torch.zeros(len(x))], 1)


def test_insertion_starts_from_the_blurred_image():
    x = torch.zeros(1, 3, 32, 32); x[..., 16, 16] = 1.
    first = torch.zeros(1, 32, 32); first[0, 16, 16] = 1 # the centre first
    c = deletion_curves(Centre(), x, first, metric='insertion', steps=4)[0]
    g = torch.exp(-torch.arange(-10., 11).pow(2) / 50); g = g / g.sum() # the blur (σ = 5 pixels) spreads the bright pixel thin
    assert c[0].item() == pytest.approx((10 * g[10]**2).sigmoid().item(), rel=1e-4)
    assert torch.allclose(c[1:], torch.tensor(10.).sigmoid())
    sharper = deletion_curves(Centre(), x, first, metric='insertion', steps=4, sigma=1.)[0]
    assert sharper[0] > c[0]


def test_faithfulness_beats_a_random_map(imagenet):
    "On the pretrained network (fixed weights, the same on every machine): inserting the pixels Grad-CAM ranks first brings the class back faster than a random order"
    from fastai_heatmap.pretrained import sample_photos
    ph = sample_photos()
    items, t = [ph[k] for k in ('cat', 'coffee', 'rocket', 'camera')], [285, 967, 657, 872]
    rnd = torch.rand(len(items), 160, 160, generator=torch.Generator().manual_seed(1))
    before = model_state(imagenet.model)
    with imagenet.no_bar():
        gc = heatmap_faithfulness(imagenet, items, 'gradcam', metric='insertion', targets=t, steps=16)
        random = heatmap_faithfulness(imagenet, items, maps=rnd, metric='insertion', targets=t, steps=16)
    assert_same_state(before, model_state(imagenet.model))
    for r in (gc, random): assert r.shape == (4,) and r.dtype == torch.float32 and ((r >= 0) & (r <= 1)).all()
    assert gc.mean() > random.mean() + 0.1, (gc, random) # measured: 0.52 against 0.34
    assert (gc > random).sum() >= 3, (gc, random)


def test_faithfulness_batching_and_items(demo):
    fns = demo.dls.valid_ds.items[:10]
    ref = heatmap_faithfulness(demo, fns, 'saliency', steps=8)
    assert torch.allclose(ref, heatmap_faithfulness(demo, fns, 'saliency', steps=8, batch_size=7, bs=3))
    assert torch.allclose(ref[3:4], heatmap_faithfulness(demo, fns[3], 'saliency', steps=8)) # per item equals batched
    maps = demo.heatmap(fns, method='saliency')
    assert torch.allclose(ref, heatmap_faithfulness(demo, fns, maps=maps, steps=8)) # a user's own maps
    t = ['1'] * 10
    assert torch.allclose(heatmap_faithfulness(demo, fns, steps=8, targets=t), heatmap_faithfulness(demo, fns, maps=demo.heatmap(fns, '1'), steps=8, targets=t))


def test_rank_correlation_is_spearman():
    stats = pytest.importorskip('scipy.stats')
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=g).float() # many ties
    b = a + torch.randint(0, 3, (6, 40), generator=g).float()
    ref = [stats.spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(rank_correlation(a, b).numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(rank_correlation(a.view(6, 5, 8), b.view(6, 5, 8)).numpy(), ref, rtol=1e-5)
    assert rank_correlation(torch.zeros(2, 9), torch.rand(2, 9)).tolist() == [0., 0.] # a constant map ranks nothing
    assert rank_correlation(torch.zeros(2, 9), torch.ones(2, 9)).tolist() == [1., 1.] # two of them: nothing changed
    with pytest.raises(ValueError, match='different shapes'): rank_correlation(a, b[:, :5])


def test_sanity_check_gradcam_loses_the_map_guided_keeps_it(imagenet):
    "Cascading randomization on the pretrained network (fixed weights): Grad-CAM's maps decorrelate from the first block randomized, guided backpropagation's barely notice the head"
    from fastai_heatmap.pretrained import sample_photos
    ph = sample_photos()
    items = [ph[k] for k in ('cat', 'coffee', 'rocket', 'camera')]
    m = imagenet.model
    m.train() # whatever the flags, they come back
    m.classifier.weight.grad = torch.ones_like(m.classifier.weight)
    try:
        before = model_state(m)
        with imagenet.no_bar():
            gc = imagenet.cam_sanity_check(items, 'gradcam', show=False)
            gb = imagenet.cam_sanity_check(items, 'guided', show=False)
        assert_same_state(before, model_state(m))
    finally:
        m.classifier.weight.grad = None
        m.eval()
    blocks = model_blocks(m)
    assert list(gc.columns) == ['randomized', 'rank_corr'] and list(gc.randomized) == ['none'] + blocks[::-1]
    assert gc.rank_corr.iloc[0] == pytest.approx(1, abs=1e-4) and gb.rank_corr.iloc[0] == pytest.approx(1, abs=1e-4)
    assert gc.rank_corr.iloc[-1] < 0.3, gc # well below its unrandomized value (measured: -0.03)
    assert gc.rank_corr.iloc[1:].max() < 0.6, gc # measured: at most 0.14
    assert gb.rank_corr.iloc[1:4].min() > 0.8, gb # guided backpropagation barely notices a random head (measured: ≥ 0.997)
    assert gb.rank_corr.iloc[-1] > gc.rank_corr.iloc[-1]
    with imagenet.no_bar():
        torch.manual_seed(1); again = imagenet.cam_sanity_check(items[:2], 'gradcam', show=False)
        torch.manual_seed(2); assert again.equals(imagenet.cam_sanity_check(items[:2], 'gradcam', show=False)) # its own seed, whatever the global one
        assert not again.equals(imagenet.cam_sanity_check(items[:2], 'gradcam', show=False, seed=1))


def test_sanity_check_grid(demo):
    items = demo.dls.valid_ds.items[:3]
    df = demo.cam_sanity_check(items, 'gradcam', blocks=['0.7', '1.8'])
    fig = plt.gcf()
    cells = [a for a in fig.axes if a.get_images()]
    assert len(cells) == 3 * 3 and list(df.randomized) == ['none', '1.8', '0.7']
    assert cells[0].get_title().startswith('original') and cells[1].get_title().startswith('1.8\n')
    np.testing.assert_allclose(np.asarray(cells[0].get_images()[1].get_array()), demo.heatmap(items[:1])[0].numpy(), atol=1e-5)


def test_model_blocks():
    wrapped = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), nn.Sequential(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))))
    assert model_blocks(wrapped) == ['0.0', '0.2', '1.0.2']
    assert model_blocks(wrapped, torch.zeros(1, 3, 8, 8)) == ['0.0', '0.2', '1.0.2']
    class Skip(nn.Module): # a block the forward pass never calls is left out when a batch is given
        def __init__(self): super().__init__(); self.a, self.b, self.unused = nn.Conv2d(3, 2, 1), nn.Linear(2, 2), nn.Linear(2, 2)
        def forward(self, x): return self.b(self.a(x).mean((2, 3)))
    assert model_blocks(Skip()) == ['a', 'b', 'unused'] and model_blocks(Skip(), torch.zeros(1, 3, 4, 4)) == ['a', 'b']
    tv = pytest.importorskip('torchvision')
    assert model_blocks(tv.models.resnet18()) == ['conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']


def test_randomize_changes_every_parameter():
    torch.manual_seed(0)
    class Own(nn.Module): # a parameter no module resets
        def __init__(self): super().__init__(); self.scale = nn.Parameter(torch.linspace(1, 2, 8))
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Own())
    with torch.no_grad():
        for p in m.parameters(): p.add_(1.)
    m[1].running_mean.fill_(3.)
    old = [p.detach().clone() for p in m.parameters()]
    randomize_(m)
    assert all(not torch.equal(a, b) for a, b in zip(old, m.parameters()))
    assert torch.equal(m[1].running_mean, torch.zeros(8)) # BatchNorm back to its initial statistics


@pytest.mark.parametrize('kind', ['timm_learn', 'timm_plain'])
def test_timm_cnns(demo, timm_plain, kind):
    learn = timm_plain if kind == 'timm_plain' else vision_learner(demo.dls, 'resnet18', pretrained=False)
    fns = demo.dls.valid_ds.items[:6]
    before = model_state(learn.model)
    r = heatmap_faithfulness(learn, fns, steps=8)
    assert r.shape == (6,) and ((r >= 0) & (r <= 1)).all()
    df = learn.cam_sanity_check(fns[:2])
    assert_same_state(before, model_state(learn.model))
    blocks = model_blocks(learn.model)
    assert len(df) == len(blocks) + 1 and df.rank_corr.iloc[0] == pytest.approx(1, abs=1e-4)
    assert any(b.endswith('layer4') for b in blocks) and any(b.endswith('conv1') for b in blocks)


@pytest.mark.parametrize('call,exc,msg', [
    (lambda l, f: heatmap_faithfulness(l, f, metric='area'), ValueError, "Unknown metric 'area': use 'deletion' (lower is better) or 'insertion'"),
    (lambda l, f: heatmap_faithfulness(l, f, steps=0), ValueError, '`steps` should be an int ≥ 1'),
    (lambda l, f: heatmap_faithfulness(l, f, steps=True), ValueError, '`steps` should be an int ≥ 1'),
    (lambda l, f: heatmap_faithfulness(l, f, batch_size=0), ValueError, '`batch_size` should be an int ≥ 1'),
    (lambda l, f: heatmap_faithfulness(l, f, substrate='noise'), ValueError, "Unknown substrate 'noise'"),
    (lambda l, f: heatmap_faithfulness(l, f, metric='insertion', sigma=0), ValueError, '`sigma`'),
    (lambda l, f: heatmap_faithfulness(l, f, maps=torch.rand(1, 64, 64)), ValueError, 'Got 1 maps for 2 items'),
    (lambda l, f: heatmap_faithfulness(l, f, maps=torch.rand(2, 32, 32)), ValueError, "at the images' resolution"),
    (lambda l, f: heatmap_faithfulness(l, f, targets='9'), ValueError, "Unknown label '9'"),
    (lambda l, f: heatmap_faithfulness(l, f, method='nope'), ValueError, "Unknown method 'nope'"),
    (lambda l, f: heatmap_faithfulness(l, []), ValueError, 'No items to score'),
    (lambda l, f: l.cam_sanity_check(f, 'nope', show=False), ValueError, "Unknown method 'nope'"),
    (lambda l, f: l.cam_sanity_check(f, blocks=['9'], show=False), ValueError, "no layer named '9'"),
    (lambda l, f: l.cam_sanity_check(f, targets='9', show=False), ValueError, "Unknown label '9'"),
    (lambda l, f: l.cam_sanity_check([], show=False), ValueError, 'No items to explain'),
])
def test_bad_input(demo, call, exc, msg):
    with pytest.raises(exc) as e: call(demo, demo.dls.valid_ds.items[:2])
    assert msg in str(e.value), str(e.value)
