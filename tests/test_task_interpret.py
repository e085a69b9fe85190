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
