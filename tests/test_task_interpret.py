"Issue 17: `HeatmapInterpretation` of segmentation learners (and, later, regression ones): fastai's own Interpretation behaviour, and top losses with maps"
import warnings
import numpy as np, pytest, torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from fastai.vision.all import DataBlock, ImageBlock, MaskBlock, PILImage, PILMask, unet_learner, resnet18, RandomSplitter
from fastai.interpret import Interpretation, SegmentationInterpretation
from fastai_heatmap.interpret import HeatmapInterpretation
from test_tasks import shapes_data, CODES
from conftest import close_to


@pytest.fixture(scope='module')
def seg12():
    "A fastai `unet_learner(resnet18)` with seeded random (untrained) weights on 12 generated images, 4 of them for validation"
    imgs, masks = shapes_data(12)
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=CODES)), get_x=lambda i: PILImage.create(imgs[i]),
                       get_y=lambda i: PILMask.create(masks[i]), splitter=RandomSplitter(valid_pct=0.34, seed=0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = unet_learner(dblock.dataloaders(range(12), bs=4, num_workers=0), resnet18, pretrained=False, n_out=3)
    learn.no_bar()
    return learn, imgs, masks


def test_segmentation_interpretation_is_fastais(seg12):
    "The calls fastai's own tests of `Interpretation` make (nbs/20_interpret.ipynb), on a segmentation learner: inputs, targets, per-item losses, top losses, the training set"
    learn, imgs, masks = seg12
    interp = HeatmapInterpretation.from_learner(learn)
    assert interp.vocab == CODES
    x, y, out = [], [], []
    for xb, yb in learn.dls.valid:
        x += xb; y += yb
        with torch.no_grad(): out += learn.model.eval()(xb)
    x, y, out = torch.stack(x), torch.stack(y), torch.stack(out)
    inps, preds, targs, decoded, losses = interp[:]
    close_to(inps, x); assert torch.equal(targs, y)
    close_to(preds, out.softmax(1), 1e-5); assert torch.equal(decoded, out.argmax(1))
    by_hand = torch.stack([F.cross_entropy(o[None], t[None].long()) for o, t in zip(out, y)]) # the mean over the pixels
    close_to(losses, by_hand, 1e-5)
    top, idx = interp.top_losses(3)
    tmp = learn.dls.test_dl(interp.items(idx), with_labels=True)
    close_to(top, learn.get_preds(dl=tmp, with_loss=True)[-1], 1e-4)
    train = HeatmapInterpretation.from_learner(learn, ds_idx=0)
    assert len(train.losses) == len(learn.dls.train_ds)
    theirs = SegmentationInterpretation.from_learner(learn) # fastai's own, on the same learner
    close_to(interp.losses, theirs.losses, 1e-6)
    assert isinstance(interp, Interpretation)


def _by_hand(learn, img, mask, target):
    "The class with the largest error and its pixels, counted by hand, and the map of that class's score over them"
    xb = learn.dls.test_dl([PILImage.create(img)], num_workers=0).one_batch()[0]
    with torch.no_grad(): pred = learn.model.eval()(xb).argmax(1)[0].cpu()
    y = torch.as_tensor(mask).long()
    wrong = pred != y
    side = pred if target == 'pred' else y
    counts = torch.tensor([int((wrong & (side == c)).sum()) for c in range(len(CODES))])
    c = int(counts.argmax())
    region = wrong & (side == c)
    return c, region, learn.heatmap(PILImage.create(img), targets=c, region=region)


@pytest.mark.parametrize('target', ['pred', 'actual'])
def test_segmentation_plot_top_losses(seg12, target):
    "A row per top loss: ground truth, prediction, and the map of the class with the most wrong pixels over those pixels (counted by hand, explained one image at a time)"
    learn, imgs, masks = seg12
    interp = HeatmapInterpretation.from_learner(learn)
    fig = interp.plot_top_losses(3, target=target)
    axs = np.array(fig.axes).reshape(3, 3)
    _, idx = interp.top_losses(3)
    for row, i in zip(axs, idx.tolist()):
        item = interp.items([i])[0]
        c, region, ref = _by_hand(learn, imgs[item], masks[item], target)
        assert row[0].get_title().startswith('actual / loss') and row[1].get_title() == 'predicted'
        assert row[2].get_title().startswith(f'map for {CODES[c]}\n{int(region.sum())} pixels outlined')
        assert region.any() and not region.all()
        drawn = torch.as_tensor(np.asarray(row[2].get_images()[1].get_array()))
        close_to(drawn, ref[0].cpu(), 1e-4) # batched in the figure == one image at a time
        gt = np.asarray(row[0].get_images()[1].get_array())
        assert (gt == masks[item]).all()
    plt.close('all')


def test_segmentation_top_losses_bad_input(seg12):
    learn, *_ = seg12
    interp = HeatmapInterpretation.from_learner(learn)
    with pytest.raises(ValueError, match="target='both' is for classifiers"): interp.plot_top_losses(2, target='both')
    with pytest.raises(ValueError, match='a row per image'): interp.plot_top_losses(2, nrows=1)
    with pytest.raises(ValueError, match='Unknown label'): interp.plot_top_losses(2, target='road')
    plt.close('all')


# ------------------------------------------------------------------------------------------------ aug_smooth moves the region with the image
def _seg_model():
    "A small segmentation model with seeded weights: (B, 3, H, W) → (B, 3, H, W), not symmetric under a horizontal flip"
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()


def test_aug_smooth_moves_the_region():
    "With aug_smooth=True, the mirror image's map is of the mirrored region: the mean of the two maps computed by hand; a pair that cannot move a region says so"
    from fastai_heatmap.core import explain
    model, x = _seg_model(), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    box = (1, 2, 5, 9) # x0, y0, x1, y1: in the left half, so that its mirror image is elsewhere
    mask = torch.zeros(12, 12, dtype=torch.bool); mask[2:9, 1:5] = True
    kw = dict(targets=1, layer='2', norm=None)
    plain = explain(model, x, region=box, **kw).maps
    mirrored = explain(model, x.flip(-1), region=mask.flip(-1), **kw).maps.flip(-1)
    for region in (box, mask, lambda p: mask):
        e = explain(model, x, region=region, aug_smooth=True, **kw)
        close_to(e.maps, (plain + mirrored) / 2, 1e-5)
        assert torch.equal(e.regions, mask.expand(2, 12, 12))
    stale = explain(model, x.flip(-1), region=mask, **kw).maps.flip(-1) # the region left where it was, on the mirror image (the old behaviour)
    assert (explain(model, x, region=box, aug_smooth=True, **kw).maps - (plain + stale) / 2).abs().max() > 1e-3
    with pytest.raises(ValueError, match='must move the region'):
        explain(model, x, region=box, aug_smooth=[(lambda t: t, lambda t: t), (lambda t: t.flip(-1), lambda t: t)], **kw)
    photometric = [(lambda t: t, lambda t: t), (lambda t: t * 1.5, lambda t: t)] # leaves the region in place
    e = explain(model, x, region=box, aug_smooth=photometric, **kw)
    close_to(e.maps, (plain + explain(model, x * 1.5, region=box, **kw).maps) / 2, 1e-5)


# ------------------------------------------------------------------------------------------------ regression top losses
@pytest.fixture(scope='module')
def reg12():
    "A tiny seeded (untrained) CNN regressing 2 numbers (the square's centre, as fractions of the side) from 12 generated images, 4 for validation"
    from torch import nn
    from fastai.vision.all import RegressionBlock, MSELossFlat, Learner
    imgs, masks = shapes_data(12)
    ys = np.stack([np.argwhere(m == 1).mean(0) / 64 for m in masks]).astype(np.float32)
    dblock = DataBlock(blocks=(ImageBlock, RegressionBlock(n_out=2)), get_x=lambda i: PILImage.create(imgs[i]), get_y=lambda i: ys[i],
                       splitter=RandomSplitter(valid_pct=0.34, seed=0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    learn = Learner(dblock.dataloaders(range(12), bs=4, num_workers=0), model, loss_func=MSELossFlat())
    learn.no_bar()
    return learn, imgs, ys


def test_regression_plot_top_losses(reg12):
    "The largest errors, titled prediction / actual / loss, each with the map of its output with the largest error (found by hand, explained one image at a time, no softmax)"
    learn, imgs, ys = reg12
    interp = HeatmapInterpretation.from_learner(learn)
    assert interp.vocab is None
    with torch.no_grad(): out = torch.cat([learn.model.eval()(xb) for xb, _ in learn.dls.valid])
    y = torch.as_tensor(ys[list(learn.dls.valid.items)])
    close_to(interp.losses, ((out - y)**2).mean(1), 1e-6)
    for target in ('pred', 1):
        fig = interp.plot_top_losses(3, target=target)
        axs = [a for a in fig.axes if a.get_images()]
        losses, idx = interp.top_losses(3)
        assert len(axs) == 3 and fig._suptitle.get_text().startswith('Prediction/Actual/Loss — gradcam')
        for ax, i, l in zip(axs, idx.tolist(), losses.tolist()):
            t = int((out[i] - y[i]).abs().argmax()) if target == 'pred' else 1
            assert ax.get_title().split('\n')[:2] == [f"{out[i, t].item():.3g} / {y[i, t].item():.3g} / {l:.3g}", f"map of output {t}"]
            ref = learn.heatmap(PILImage.create(imgs[interp.items([i])[0]]), targets=t)[0].cpu()
            close_to(torch.as_tensor(np.asarray(ax.get_images()[1].get_array())), ref, 1e-4)
        plt.close('all')
    with pytest.raises(TypeError, match='for classifiers; this is a regression learner'): interp.class_heatmaps()
    with pytest.raises(TypeError, match='for classifiers'): interp.confusion_matrix()
    with pytest.raises(ValueError, match="output with the largest error"): interp.plot_top_losses(2, target='both')


# ------------------------------------------------------------------------------------------------ the command line on a segmentation learner
def _mask_file(f): return f.parent.parent/'masks'/f.name # module level: the exported learner pickles it


def test_cli_explain_segmentation(tmp_path):
    "`fastai-heatmap explain` on an exported unet_learner: per image, a PNG and a .npy for each class it predicts (found by hand), each the class's map over its predicted pixels"
    from PIL import Image
    from fastai.vision.all import get_image_files, load_learner
    from fastai_heatmap.cli import main
    imgs, masks = shapes_data(6)
    for d in ('images', 'masks'): (tmp_path/d).mkdir()
    for i, (im, m) in enumerate(zip(imgs, masks)):
        Image.fromarray(im).save(tmp_path/'images'/f'{i}.png'); Image.fromarray(m).save(tmp_path/'masks'/f'{i}.png')
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=CODES)), get_items=get_image_files, get_y=_mask_file, splitter=RandomSplitter(seed=0))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = unet_learner(dblock.dataloaders(tmp_path/'images', bs=2, num_workers=0), resnet18, pretrained=False, n_out=3)
    learn.export(tmp_path/'seg.pkl')
    files = sorted((tmp_path/'images').glob('*.png'))[:3]
    assert main(['explain', str(tmp_path/'seg.pkl'), *map(str, files), '--out', str(tmp_path/'out'), '--maps']) == 0
    learn = load_learner(tmp_path/'seg.pkl')
    import pandas as pd
    rows = pd.read_csv(tmp_path/'out'/'predictions.csv')
    for f in files:
        xb = learn.dls.test_dl([f], num_workers=0).one_batch()[0]
        with torch.no_grad(): pred = learn.model.eval()(xb).argmax(1)[0]
        present = [c for c in range(3) if (pred == c).any()]
        mine = rows[rows.file == str(f)]
        assert mine.explained.tolist() == [CODES[c] for c in present] and mine.heatmap.tolist() == [f'{f.stem}_{CODES[c]}.png' for c in present]
        for c, share in zip(present, mine.probability):
            assert abs(share - (pred == c).float().mean().item()) < 1e-4
            assert (tmp_path/'out'/f'{f.stem}_{CODES[c]}.png').exists()
            close_to(torch.from_numpy(np.load(tmp_path/'out'/f'{f.stem}_{CODES[c]}.npy')), learn.heatmap(f, targets=c)[0].cpu(), 1e-4)
    assert main(['explain', str(tmp_path/'seg.pkl'), str(files[0]), '--out', str(tmp_path/'o2'), '--target', 'disc']) == 2
