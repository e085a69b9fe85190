"""Pictures composed with numpy (`heatmap_overlay`, the command line's `save_heatmap`) are pixel for pixel the pictures
matplotlib drew before: the reference below is `save_heatmap` as it was, a matplotlib figure per PNG."""
import numpy as np, pytest, torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from PIL import Image
from fastai_heatmap.draw import show_heatmap, heatmap_overlay
import fastai_heatmap.cli as cli
from fastai_heatmap.cli import save_heatmap


def reference(fn, img, hm, region, model_img=None, title='', alpha=0.6, cmap='magma', min_width=320):
    "`save_heatmap` as it was before pictures were composed with numpy"
    pic = img if region is not None else model_img
    w, h = pic.size if hasattr(pic, 'size') and not isinstance(pic, torch.Tensor) else (pic.shape[-1], pic.shape[-2])
    scale, dpi = max(1., min_width / w), 100
    fig = plt.figure(figsize=(w*scale/dpi, h*scale/dpi + 0.35), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h*scale/dpi / (h*scale/dpi + 0.35)))
    show_heatmap(pic, hm, ax=ax, alpha=alpha, cmap=cmap, region=region, vmin=0, vmax=1)
    fig.suptitle(title, y=0.995, va='top', fontsize=10)
    fig.savefig(fn, dpi=dpi)
    plt.close(fig)
    return fn


def photo(w, h, seed=0):
    "A colourful RGB image with edges and noise (any resampling error shows)"
    rng = np.random.default_rng(seed)
    lo = torch.from_numpy(rng.random((1, 3, 5, 5), dtype=np.float32))
    a = F.interpolate(lo, size=(h, w), mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
    a = a + 0.15*rng.standard_normal((h, w, 3))
    a[h//3:h//2, :] = 1.0
    return Image.fromarray((a.clip(0, 1)*255).astype(np.uint8))


def a_map(h, w, seed=0, sharp=False):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(1, 1, h, w, generator=g) if sharp else F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(h, w), mode='bilinear', align_corners=False)
    m = m[0, 0]
    return (m - m.min()) / (m.max() - m.min())


def pixels(fn): return np.asarray(Image.open(fn))


CASES = [  # image (w, h), map (h, w), title, options
    ((64, 64), (64, 64), '7 (0.98)', {}),                      # the digits: enlarged 5×
    ((64, 48), (48, 64), 'cat (0.51), map for dog', {}),
    ((100, 100), (64, 64), '1 (1.00)', {}),                    # 3.2×, a map from a resizing learner
    ((40, 40), (40, 40), 'a', dict(alpha=0.35, cmap='jet')),
    ((50, 30), (16, 16), 'not 7 (0.77)', dict(alpha=1.0)),     # a map at the layer's resolution
    ((320, 320), (64, 64), 'x', dict(alpha=0.0)),
    ((81, 57), (57, 81), 'sharp', {}),                         # 320/81: not a whole number of pixels
    ((64, 64), (64, 64), 'two\nlines', {}),                    # a title that reaches into the picture
    ((64, 64), (64, 64), '', {}),
    ((160, 120), (120, 160), 'twice', {}),                     # 2×: pixel for pixel, a map enlarged 2× (matplotlib colours, then resamples)
    ((224, 224), (224, 224), 'smoothed', {}),                  # 1.43×: matplotlib smooths the image
    ((500, 375), (224, 224), 'photo', {}),                     # not enlarged
]


@pytest.mark.parametrize('size,msize,title,kw', CASES)
def test_save_heatmap_same_pixels(tmp_path, size, msize, title, kw):
    img = photo(*size)
    hm = a_map(*msize, sharp=title == 'sharp')
    region = (0., float(size[0]), 0., float(size[1]))
    save_heatmap(tmp_path/'new.png', img, hm, region, title=title, **kw)
    reference(tmp_path/'ref.png', img, hm, region, title=title, **kw)
    a, b = pixels(tmp_path/'new.png'), pixels(tmp_path/'ref.png')
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a, b), f'{int((a != b).any(-1).sum())} pixels differ (at most by {np.abs(a.astype(int) - b).max()})'


def test_save_heatmap_on_what_the_model_saw_and_cropped(tmp_path):
    "Drawn on the decoded model input (region None), and a map covering part of the image (a crop): the same pixels"
    img = photo(64, 64, seed=1)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    for region, pic in ((None, t), ((8., 56., 0., 64.), img), ((-4., 68., -4., 68.), img)):
        save_heatmap(tmp_path/'new.png', pic if region is not None else None, a_map(64, 64, 2), region, model_img=t, title='3 (0.50)')
        reference(tmp_path/'ref.png', pic if region is not None else None, a_map(64, 64, 2), region, model_img=t, title='3 (0.50)')
        assert np.array_equal(pixels(tmp_path/'new.png'), pixels(tmp_path/'ref.png')), region


def test_digits_need_no_figure(tmp_path, monkeypatch):
    "A digit's PNG, with a title written before, is composed without any matplotlib figure"
    img, hm = photo(64, 64), a_map(64, 64)
    save_heatmap(tmp_path/'a.png', img, hm, (0., 64., 0., 64.), title='4 (0.93)')
    def no_figure(*a, **k): raise AssertionError('a matplotlib figure was made')
    monkeypatch.setattr(cli.plt, 'figure', no_figure)
    monkeypatch.setattr(cli, 'Figure', no_figure)
    save_heatmap(tmp_path/'b.png', img, a_map(64, 64, 5), (0., 64., 0., 64.), title='4 (0.93)')
    assert pixels(tmp_path/'b.png').shape == (355, 320, 4)


@pytest.mark.parametrize('size,out', [((16, 16), (128, 128)), ((16, 16), (40, 40)), ((16, 12), (48, 36)), ((30, 20), (30, 20))])
def test_heatmap_overlay_is_show_heatmap(size, out):
    "`heatmap_overlay` gives what `show_heatmap` draws on an axes of that size filling its figure"
    img, hm = photo(*size, seed=3), a_map(4, 4, 4)
    fig = plt.figure(figsize=(out[0]/100, out[1]/100), dpi=100)
    show_heatmap(img, hm, ax=fig.add_axes((0, 0, 1, 1)), vmin=0, vmax=1)
    fig.canvas.draw()
    ref = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    got = heatmap_overlay(img, hm, size=out)
    assert got.shape == (out[1], out[0], 3) and got.dtype == np.uint8
    assert np.array_equal(got, ref)


def test_heatmap_overlay_bad_input():
    img, hm = photo(16, 16), a_map(4, 4)
    with pytest.raises(ValueError, match='opacity'): heatmap_overlay(img, hm, alpha=2)
    with pytest.raises(ValueError, match='colour map'): heatmap_overlay(img, hm, cmap='nope')
