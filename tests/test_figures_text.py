"""The figures issue 15 names (a map with its colour bar, show_cam, top losses, class heatmaps, confusion heatmaps), at their
default size and at a small `figsize`, with long class names: no two pieces of text overlap, and no text falls outside the
canvas, nor outside what `savefig(bbox_inches='tight')` keeps (the drawing layer's `fit_text` sees to it);
`test_text_problems_finds_collisions` checks the checker.
Not drawn here yet: show_cams, show_methods, show_heatmaps, the filters/feature-map views, max_activation,
cam_sanity_check, plot_faithfulness, the concept views, HeatmapCallback.show."""
import itertools, textwrap, warnings
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np, pandas as pd, pytest, torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch import nn
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, GrandparentSplitter, get_image_files, Normalize, imagenet_stats,
                               Learner, CrossEntropyLossFlat, PILImage, ProgressCallback)
from fastai_heatmap.all import *

LONG = {'0': 'a handwritten zero on a noisy canvas', '1': 'a handwritten one, thin and upright',
        '4': 'a handwritten four with an open top', '7': 'a handwritten seven with a crossbar'}


@pytest.fixture(scope='module')
def long_names():
    "A tiny seeded (untrained) CNN with a pooling → linear head on the digits, whose class names are long sentences"
    path = make_digits()
    dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'),
                    get_y=lambda f: LONG[f.parent.name], batch_tfms=Normalize.from_stats(*imagenet_stats)).dataloaders(path, bs=32, num_workers=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
    learn.remove_cb(ProgressCallback) # no progress bars in the test's output
    return learn


def _figure(out):
    "The figure a drawing function made, from what it returns (a figure, axes, a list of axes, or something else: the current figure)"
    if isinstance(out, Figure): return out
    if hasattr(out, 'figure') and isinstance(out.figure, Figure): return out.figure
    if isinstance(out, (list, tuple, np.ndarray)) and len(out) and hasattr(np.ravel(out)[0], 'figure'): return np.ravel(out)[0].figure
    return plt.gcf()


def _ticklabels(ax):
    "The tick labels `ax` draws: those of the ticks inside its view, on the sides whose labels are on"
    if not ax.axison: return []
    return [t for axis in (ax.xaxis, ax.yaxis) if axis.get_visible() for tick in axis._update_ticks() for t in (tick.label1, tick.label2)
            if t.get_visible()]


def _texts(fig):
    "Every text the figure draws: its suptitle and texts, and each visible axes' titles, axis labels, tick labels, texts and legend"
    ts = list(fig.texts) + [l for lg in fig.legends for l in lg.get_texts()]
    if fig._suptitle is not None: ts.append(fig._suptitle)
    for ax in fig.axes:
        if not ax.get_visible(): continue
        ts += [ax.title, ax._left_title, ax._right_title] + list(ax.texts) + _ticklabels(ax)
        if ax.axison: ts += [ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend() is not None: ts += ax.get_legend().get_texts()
    return list({id(t): t for t in ts if t.get_visible() and t.get_text().strip()}.values())


def text_problems(fig, tol=1.0):
    "Pairs of overlapping texts and texts outside the canvas or the tight bounding box of `fig`, as strings"
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    W, H = fig.canvas.get_width_height()
    texts = _texts(fig)
    boxes = [t.get_window_extent(r) for t in texts]
    tight = fig.get_tightbbox(r).transformed(fig.dpi_scale_trans) # what savefig(bbox_inches='tight') keeps, in pixels
    probs = []
    name = lambda t: repr(t.get_text()[:40])
    for t, b in zip(texts, boxes):
        if b.x0 < -tol or b.y0 < -tol or b.x1 > W + tol or b.y1 > H + tol: probs.append(f"{name(t)} outside the {W}×{H} canvas: {b.bounds}")
        if b.x0 < tight.x0 - tol or b.y0 < tight.y0 - tol or b.x1 > tight.x1 + tol or b.y1 > tight.y1 + tol: probs.append(f"{name(t)} cut by savefig's tight box")
    for (t, b), (u, c) in itertools.combinations(zip(texts, boxes), 2):
        w, h = min(b.x1, c.x1) - max(b.x0, c.x0), min(b.y1, c.y1) - max(b.y0, c.y0)
        if w > tol and h > tol: probs.append(f"{name(t)} overlaps {name(u)} by {w:.0f}×{h:.0f} px")
    return probs


def _figures(learn, tmp_path):
    "(name, function of figsize) for the figures issue 15 names: a map with its colour bar, show_cam, top losses, class and confusion heatmaps"
    vl = learn.dls.valid_ds.items
    f, files = vl[0], list(vl[:4])
    img = np.asarray(PILImage.create(f))
    hm = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(vl[:48], with_labels=True))
    return {
        'show_heatmap': lambda fs: show_heatmap(img, hm, figsize=fs, title=LONG['0'], colorbar=True),
        'show_cam': lambda fs: learn.show_cam(f, figsize=fs),
        'show_cam colorbar': lambda fs: learn.show_cam(f, figsize=fs, colorbar=True),
        'show_cam target': lambda fs: learn.show_cam(f, target=LONG['7'], figsize=fs, colorbar=True),
        'plot_top_losses': lambda fs: interp.plot_top_losses(9, figsize=fs),
        'plot_class_heatmaps': lambda fs: interp.plot_class_heatmaps(figsize=fs, max_n=4),
        'plot_confused_heatmaps': lambda fs: interp.plot_confused_heatmaps(max_pairs=3, figsize=fs),
        'plot_confused_heatmaps none': lambda fs: interp.plot_confused_heatmaps(min_val=10**6, figsize=fs),
    }


def test_no_text_collides(long_names, tmp_path_factory):
    "Every figure, at its default size and at a small one (0.6 of it, at least 2.5×2 inches): no overlapping text, none outside the canvas or savefig's box"
    tmp_path = tmp_path_factory.mktemp('figures')
    bad = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name, draw in _figures(long_names, tmp_path).items():
            fs = None
            for _ in range(2):
                plt.close('all')
                fig = _figure(draw(fs))
                fig.savefig(tmp_path/f'{name}-{fs}.png') # draws the canvas as a user's savefig would
                p = text_problems(fig)
                if p: bad[f"{name} figsize={fs}"] = p
                w, h = fig.get_size_inches()
                fs = (round(max(0.6 * w, 2.5), 2), round(max(0.6 * h, 2), 2)) # small: 0.6 of the default size, at least 2.5×2 inches
    plt.close('all')
    assert not bad, '\n'.join(f"{k}:\n  " + '\n  '.join(v) for k, v in bad.items())


def test_text_problems_finds_collisions():
    "The check itself: two titles drawn on each other, and a title outside the canvas, are found; a clean figure passes"
    fig, axs = plt.subplots(1, 2, figsize=(3, 2))
    axs[0].set_title('a title far too long for its half of a small figure')
    axs[1].set_title('another title far too long for its half')
    assert any('overlaps' in p for p in text_problems(fig))
    fig = plt.figure(figsize=(2, 2)); fig.text(0.5, 1.1, 'above the canvas')
    assert any('outside' in p for p in text_problems(fig))
    fig, ax = plt.subplots(figsize=(4, 3)); ax.set_title('fits')
    assert text_problems(fig) == []
    plt.close('all')
