"""HeatmapInterpretation: fastai's own Interpretation tests on it, plot_top_losses and its titles and maps, 'both',
class and confusion heatmaps, multi-label and single-logit learners, bad input, and the `explain` CLI round trip."""
import re
import numpy as np, pandas as pd, pytest, torch
import matplotlib.pyplot as plt
from pathlib import Path
from PIL import Image
from fastai.vision.all import (DataBlock, ImageBlock, MultiCategoryBlock, CategoryBlock, GrandparentSplitter, get_image_files,
                               vision_learner, resnet18, Normalize, imagenet_stats, ClassificationInterpretation, L, to_cpu,
                               BCEWithLogitsLossFlat, load_learner, set_seed, Learner, CrossEntropyLossFlat, nn)
from fastai_heatmap.all import *
from fastai_heatmap.cli import main
from conftest import model_state, assert_same_state


@pytest.fixture(scope='module')
def interp(demo): return HeatmapInterpretation.from_learner(demo)


def _cells(fig): return [a for a in fig.axes if a.get_images()]


def test_fastai_interpretation_tests(demo, interp):
    "fastai's own tests for Interpretation and ClassificationInterpretation (nbs/20_interpret.ipynb), on HeatmapInterpretation"
    x, y, out = [], [], []
    for xb, yb in demo.dls.valid:
        x += xb; y += yb
        with torch.no_grad(): out += demo.model.eval()(xb)
    x, y, out = torch.stack(x), torch.stack(y), torch.stack(out)
    inps, preds, targs, decoded, losses = interp[:]
    assert torch.equal(inps, to_cpu(x)) and torch.equal(targs, to_cpu(y))
    torch.testing.assert_close(losses, to_cpu(torch.stack([demo.loss_func(p, t) for p, t in zip(out, y)])), rtol=1e-3, atol=1e-4)
    top, idx = interp.top_losses(9)
    tmp_dl = demo.dls.test_dl(L(interp.dl.items)[idx], with_labels=True)
    _, _, _, _, l2 = demo.get_preds(dl=tmp_dl, with_input=True, with_loss=True, with_decoded=True, act=None, reorder=False)
    torch.testing.assert_close(top, l2, rtol=1e-3, atol=1e-3)
    tr = HeatmapInterpretation.from_learner(demo, ds_idx=0)  # the training set
    assert len(tr.losses) == len(demo.dls.train_ds)
    cm = interp.confusion_matrix()
    assert cm.shape == (4, 4) and cm.sum() == len(demo.dls.valid_ds)
    np.testing.assert_array_equal(cm, ClassificationInterpretation.from_learner(demo).confusion_matrix())
    assert interp.most_confused() == ClassificationInterpretation.from_learner(demo).most_confused()
    interp.plot_confusion_matrix(); interp.print_classification_report(); interp.show_results([0, 1])
    plt.close('all')


def test_plot_top_losses(demo, interp):
    k = 9
    fig = interp.plot_top_losses(k, layer='0.6')
    cells = _cells(fig)
    assert len(cells) == k and all(len(a.get_images()) == 2 for a in cells)
    assert 'Probability of the actual class' in fig._suptitle.get_text()
    losses, idx = interp.top_losses(k)
    e = demo.explain(L(interp.dl.items)[idx.tolist()], layer='0.6')
    probs = e.preds.softmax(1)
    for a, l, i, p in zip(cells, losses, idx.tolist(), probs):
        pred, actual, loss, prob = [o.strip() for o in a.get_title().split('\n')[0].split('/')]
        truth = interp.dl.items[i].parent.name
        assert (pred, actual) == (demo.dls.vocab[p.argmax()], truth)
        assert float(loss) == pytest.approx(l.item(), abs=0.006)
        assert float(prob) == pytest.approx(p[demo.dls.vocab.o2i[truth]].item(), abs=0.006)  # the actual class's probability
    drawn = np.stack([a.get_images()[1].get_array().data for a in cells])
    np.testing.assert_allclose(drawn, e.maps.cpu().numpy(), rtol=1e-5, atol=1e-6)  # the maps it draws are learn.heatmap's
    plt.close('all')


@pytest.fixture(scope='module')
def confused(demo, mislabeled): return HeatmapInterpretation.from_learner(demo, dl=mislabeled)


def test_plot_top_losses_both_and_options(demo, interp, confused):
    fig = confused.plot_top_losses(4, target='both', layer='0.6')
    cells = _cells(fig)
    assert len(cells) == 8
    losses, idx = confused.top_losses(4)
    e = demo.explain(L(confused.dl.items)[idx.tolist()], layer='0.6')
    wrong = [j for j, i in enumerate(idx.tolist()) if demo.dls.vocab[e.preds[j].argmax()] != confused.dl.items[i].parent.name]
    assert wrong, 'the mislabeled images are among the top losses'
    for j in wrong:
        left, right = cells[2*j], cells[2*j+1]
        pred, actual = [o.strip() for o in left.get_title().split('\n')[0].split('/')[:2]]
        assert pred != actual
        assert left.get_title().split('\n')[1] == f'map for {pred}' and right.get_title().split('\n')[0] == f'map for {actual}'  # then 'no positive evidence for …' when the map is blank
        maps = confused.heatmaps([idx[j].item()], target='both', layer='0.6')[0]
        np.testing.assert_allclose(left.get_images()[1].get_array().data, maps[0].cpu().numpy(), atol=1e-6)
        np.testing.assert_allclose(right.get_images()[1].get_array().data, maps[1].cpu().numpy(), atol=1e-6)
        assert not torch.allclose(maps[0], maps[1])  # two different classes explained
    # 'actual' explains the label; k as a range; no titles for publication figures; fastai's plain plot
    t = interp.heatmaps(idx.tolist(), target='actual', layer='0.6')
    torch.testing.assert_close(t, demo.heatmap(L(interp.dl.items)[idx.tolist()], targets=[interp.dl.items[i].parent.name for i in idx.tolist()], layer='0.6'))
    assert len(_cells(interp.plot_top_losses(range(7, 16), layer='0.6'))) == 9
    quiet = interp.plot_top_losses(3, layer='0.6', show_text=False)
    assert all(a.get_title() == '' for a in quiet.axes) and quiet._suptitle is None
    assert len(_cells(interp.plot_top_losses(3, largest=False, layer='0.6'))) == 3
    plain = interp.plot_top_losses(3, heatmap=False)
    assert all(len(a.get_images()) == 1 for a in _cells(plain))
    assert len(_cells(interp.show_heatmaps([0, 5], target='both', layer='0.6'))) == 4
    plt.close('all')


def test_bad_input(demo, interp):
    n = len(interp.losses)
    with pytest.raises(ValueError, match='1 or more'): interp.plot_top_losses(0)
    with pytest.raises(ValueError, match=f'only {n} items'): interp.plot_top_losses(n + 1)
    with pytest.raises(IndexError, match='sorted losses'): interp.plot_top_losses([n])
    with pytest.raises(ValueError, match='Unknown target'): interp.plot_top_losses(3, target='nope')
    with pytest.raises(ValueError, match='Unknown target'): interp.plot_top_losses(3, target='9')
    with pytest.raises(IndexError, match='range'): interp.heatmaps([n + 5])
    with pytest.raises(ValueError, match='Unknown target'): interp.class_heatmaps(target='both')
    before = model_state(demo.model)
    with pytest.raises(ValueError): interp.plot_top_losses(3, method='cam')
    assert_same_state(before, model_state(demo.model))
    plt.close('all')


def test_class_and_confused_heatmaps(demo, interp, confused):
    ch = interp.class_heatmaps(layer='0.6')
    assert ch.maps.shape == (4, 64, 64) and ch.images.shape == (4, 3, 64, 64)
    assert ch.counts.tolist() == [int((torch.tensor([demo.dls.vocab.o2i[f.parent.name] for f in interp.dl.items]) == c).sum()) for c in range(4)]
    # the mean map of class c is the mean of the 'actual' maps of its items
    fns = L(interp.dl.items)
    one = [i for i, f in enumerate(fns) if f.parent.name == '4']
    torch.testing.assert_close(ch.maps[2], interp.heatmaps(one, target='actual', layer='0.6').mean(0).cpu(), rtol=1e-4, atol=1e-5)
    # the mean image is the decoded mean of the inputs
    np.testing.assert_allclose(ch.images[2].float().numpy(), np.stack([np.asarray(Image.open(fns[i])) for i in one]).mean(0).transpose(2, 0, 1), atol=1.5)
    # the digits are anywhere but the border is mostly background: less mass there than a uniform map
    assert (ch.border_mass < ch.uniform_border).all()
    capped = interp.class_heatmaps(layer='0.6', max_n=5)
    assert capped.counts.tolist() == [5, 5, 5, 5]
    fig = interp.plot_class_heatmaps(layer='0.6')
    assert len(_cells(fig)) == 4 and all('border' in a.get_title() for a in _cells(fig))
    fig = confused.plot_confused_heatmaps(layer='0.6')
    pairs = confused.most_confused()[:6]
    assert pairs and len(_cells(fig)) == 2 * len(pairs)
    assert _cells(fig)[0].get_title().startswith(f'actual {pairs[0][0]} → predicted {pairs[0][1]}')
    # the two maps of a pair are on one colour scale: the pair's larger maximum is 1, and both are drawn from 0 to 1
    for left, right in zip(_cells(fig)[::2], _cells(fig)[1::2]):
        a, b = left.get_images()[1], right.get_images()[1]
        assert a.get_clim() == b.get_clim() == (0, 1)
        assert max(a.get_array().max(), b.get_array().max()) == pytest.approx(1)
    assert len(confused.plot_confused_heatmaps(min_val=1000).texts) == 1  # nothing to show, said on the figure
    plt.close('all')


@pytest.fixture(scope='module')
def multi(demo):
    "A multi-label learner on the digits (the digit, and whether it is 'big' (4 or 7)), and a single-logit binary one ('one' or not)"
    path = demo.dls.path
    def learner(get_y):
        dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                           get_y=get_y, batch_tfms=Normalize.from_stats(*imagenet_stats))
        set_seed(0)
        return vision_learner(dblock.dataloaders(path, bs=64, num_workers=0), resnet18, pretrained=False)
    return (learner(lambda f: [f.parent.name] + (['big'] if f.parent.name in '47' else [])),
            learner(lambda f: ['one'] if f.parent.name == '1' else []))


def test_multilabel(multi):
    ml, binary = multi
    assert isinstance(ml.loss_func, BCEWithLogitsLossFlat)
    interp = HeatmapInterpretation.from_learner(ml)
    idxs = [0, 50, 100, 140]
    e, _, ys = interp.explain(idxs, 'actual')
    maps = interp.heatmaps(idxs, target='actual')
    assert maps.shape == (4, 5, 64, 64)
    positive = maps.flatten(2).amax(2) > 0
    assert not (positive & (ys < 0.5)).any()  # maps only for the positive labels
    raw = ml.heatmap(L(interp.dl.items)[idxs], targets=torch.arange(5).expand(4, 5))
    torch.testing.assert_close(maps, raw * (ys > 0.5)[..., None, None].to(raw.device))
    fig = interp.plot_top_losses(4)
    cells = _cells(fig)
    assert len(cells) == 4
    # each cell shows the label with the largest loss
    losses, idx = interp.top_losses(4)
    e = ml.explain(L(interp.dl.items)[idx.tolist()])
    _, _, ys = interp.explain(idx.tolist(), 'actual')
    worst = torch.nn.functional.binary_cross_entropy_with_logits(e.preds, ys.float(), reduction='none').argmax(1)
    assert [a.get_title().split(':')[0] for a in cells] == [interp.vocab[j] for j in worst.tolist()]
    assert len(_cells(interp.show_heatmaps(idxs, target='actual'))) >= 4
    ch = interp.class_heatmaps(max_n=8)
    assert ch.maps.shape[0] == 5 and ch.counts.max() <= 8
    with pytest.raises(ValueError, match="'pred' or 'actual'"): interp.heatmaps(idxs, target='both')
    # single logit: explained for its one output, positive or not
    bi = HeatmapInterpretation.from_learner(binary)
    m = bi.heatmaps([0, 1, 2])
    assert m.shape == (3, 1, 64, 64) and (m.flatten(1).amax(1) > 0).all()
    torch.testing.assert_close(m[:, 0], binary.heatmap(L(bi.dl.items)[[0, 1, 2]], targets=0))
    assert len(_cells(bi.plot_top_losses(3))) == 3
    plt.close('all')


def test_cli_round_trip(demo, tmp_path, capsys):
    pkl = tmp_path/'model.pkl'
    demo.export(pkl)
    imgs = tmp_path/'imgs'; (imgs/'sub').mkdir(parents=True)
    fns = list(demo.dls.valid_ds.items[:5])
    for i, f in enumerate(fns): Image.open(f).save((imgs/'sub' if i % 2 else imgs)/f'img{i}.png')
    (imgs/'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    extra = tmp_path/'extra.png'; Image.open(fns[0]).save(extra)
    out = tmp_path/'out'
    rc = main(['explain', str(pkl), str(imgs), str(extra), '--out', str(out), '--layer', '0.6', '--bs', '2'])
    assert rc == 1  # one file failed
    err = capsys.readouterr().err
    assert 'corrupt.png' in err
    df = pd.read_csv(out/'predictions.csv', dtype={'predicted': str, 'explained': str})
    assert len(df) == 6 and list(df.columns) == ['file', 'predicted', 'probability', 'explained', 'heatmap']
    assert sorted(p.name for p in out.glob('*.png')) == sorted(df.heatmap)
    row = df[df.file == str(extra)].iloc[0]
    e = demo.explain([fns[0]], layer='0.6')
    assert row.predicted == demo.dls.vocab[e.preds[0].argmax()] == row.explained
    assert row.probability == pytest.approx(e.preds[0].softmax(0).max().item(), abs=1e-4)
    png = Image.open(out/row.heatmap)
    assert png.size[0] == 320 and png.size[1] > 320  # the 64-pixel original enlarged to 320 pixels, and a title above it
    # a label to explain in every image, and cam on a head that is not pooling → Linear: a clear error, status 2
    assert main(['explain', str(pkl), str(extra), '--out', str(tmp_path/'o2'), '--target', '1', '--layer', '0.6']) == 0
    assert (pd.read_csv(tmp_path/'o2'/'predictions.csv', dtype=str).explained == '1').all()
    assert main(['explain', str(pkl), str(extra), '--out', str(tmp_path/'o3'), '--method', 'cam']) == 2
    err = capsys.readouterr().err
    assert "Use --method gradcam" in err and "method='" not in err and 'Traceback' not in err
    assert main(['explain', str(tmp_path/'nope.pkl'), str(extra), '--out', str(tmp_path/'o4')]) == 2
    with pytest.raises(SystemExit): main(['explain', '--help'])
    helptext = capsys.readouterr().out
    for opt in ('--out', '--method', '--target', '--layer', '--bs', '--alpha', '--cmap'): assert opt in helptext


def test_not_images(tmp_path):
    "A tabular learner, and a learner whose inputs (5 channels) cannot be drawn as images: each a clear error"
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify
    df = pd.DataFrame({'a': np.random.randn(64), 'c': np.random.choice(['x', 'y'], 64), 'y': np.random.choice(['p', 'q'], 64)})
    dls = TabularDataLoaders.from_df(df, path=tmp_path, cat_names=['c'], cont_names=['a'], y_names='y', y_block=CategoryBlock(), procs=[Categorify], bs=16)
    with pytest.raises(TypeError, match='tabular or text'): HeatmapInterpretation.from_learner(tabular_learner(dls, n_out=2))
    from fastai.data.core import DataLoaders, Datasets
    from fastai.learner import Learner
    from torch import nn
    ds = [(torch.randn(5, 16, 16), torch.tensor(i % 2)) for i in range(16)]
    model = nn.Sequential(nn.Conv2d(5, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=8), model, loss_func=nn.CrossEntropyLoss())
    from fastai_heatmap.learner import explain_dl
    maps = explain_dl(learn, learn.dls.valid)[0].maps  # the maps themselves are fine
    assert maps.shape == (16, 16, 16)
    with pytest.raises(TypeError, match='cannot be drawn as an image'): explain_dl(learn, learn.dls.valid, with_input=True)


class _Bands(nn.Module):
    "Fixed weights: channel 0 is the image's brightness in its top 8 rows, channel 1 its brightness in the centre (rows and columns 16-47)"
    def __init__(self):
        super().__init__()
        m = torch.zeros(2, 64, 64); m[0, :8] = 1; m[1, 16:48, 16:48] = 1
        self.register_buffer('mask', m)
        self.gray = nn.Conv2d(3, 1, 1)  # the mean of the three channels
        with torch.no_grad(): self.gray.weight.fill_(1 / 3); self.gray.bias.zero_()
    def forward(self, x): return torch.sigmoid(self.gray(x)) * self.mask


def _band_learner(shortcut:bool):
    "A digits learner with hand-set weights: every class is scored on the centre, except that with `shortcut` '7' is scored on the top band only"
    dls = digits_dls(make_digits(cue=7))
    head = nn.Linear(2, 4, bias=False)
    seven = dls.vocab.o2i['7']
    with torch.no_grad():
        head.weight.zero_(); head.weight[:, 1] = 1
        if shortcut: head.weight[seven] = torch.tensor([1., 0.])
    model = nn.Sequential(_Bands(), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat()), seven


def test_class_heatmaps_catch_a_shortcut():
    """A model whose '7' is scored on the image's top band (hand-set weights: the stripe every 7 carries in `make_digits(cue=7)`):
    the class heatmaps put 7's map in the border and the others' in the centre; the same model scoring 7 on the centre flags nothing"""
    learn, seven = _band_learner(shortcut=True)
    for method in ('gradcam', 'cam'):
        ch = HeatmapInterpretation.from_learner(learn).class_heatmaps(method, layer='0')
        others = [c for c in range(4) if c != seven]
        assert ch.border_mass[seven] > ch.uniform_border
        assert ch.border_mass[seven] > ch.border_mass[others].max() + 0.1
        rows = ch.maps[seven].mean(1)  # the map's mass sits in the top rows, where the stripe is
        assert rows[:8].mean() > 2 * rows[24:].mean()
    clean = HeatmapInterpretation.from_learner(_band_learner(shortcut=False)[0]).class_heatmaps(layer='0')
    assert (clean.border_mass < clean.uniform_border).all()


def test_cli_images_of_different_sizes(demo, tmp_path):
    """The demo learner does not resize: the CLI explains images of several sizes (a batch per size), every one once,
    with predictions.csv in sorted path order and each prediction that of the image alone"""
    pkl = tmp_path/'model.pkl'
    demo.export(pkl)
    imgs = tmp_path/'imgs'; imgs.mkdir()
    fn = demo.dls.valid_ds.items[0]
    sizes = {'c.png': (64, 64), 'a.png': (48, 40), 'b.png': (96, 80), 'd.png': (48, 40)}
    for name, s in sizes.items(): Image.open(fn).resize(s).save(imgs/name)
    out = tmp_path/'out'
    assert main(['explain', str(pkl), str(imgs), '--out', str(out), '--layer', '0.6', '--bs', '4']) == 0
    df = pd.read_csv(out/'predictions.csv', dtype={'predicted': str, 'explained': str})
    assert list(df.file) == sorted(str(imgs/n) for n in sizes)
    assert all((out/h).exists() for h in df.heatmap)
    for name in sizes:
        e = demo.explain(imgs/name, layer='0.6')
        row = df[df.file == str(imgs/name)].iloc[0]
        assert row.predicted == demo.dls.vocab[e.preds[0].argmax()]
        assert row.probability == pytest.approx(e.preds[0].softmax(0).max().item(), abs=1e-4)
