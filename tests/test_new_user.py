"""What a new user hit (issue 15): labels that are numbers, DataLoaders with bs=1, channels-first arrays, truncated files,
the multi-label command line, and torch's FutureWarning on every run of the command."""
import os, subprocess, sys, warnings
import numpy as np, pandas as pd, pytest, torch
from pathlib import Path
from PIL import Image
from torch import nn
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, MultiCategoryBlock, GrandparentSplitter, get_image_files, parent_label,
                               Normalize, imagenet_stats, vision_learner, resnet18, Learner, BCEWithLogitsLossFlat)
from fastai_heatmap.all import *
from fastai_heatmap.cli import main


@pytest.fixture(scope='module')
def int_labels(demo):
    "The demo model on DataLoaders whose labels are ints (0, 1, 4, 7), as a DataFrame column of numbers gives, with batches of one"
    dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'),
                    get_y=lambda f: int(f.parent.name), batch_tfms=Normalize.from_stats(*imagenet_stats)).dataloaders(demo.dls.path, bs=1, num_workers=0)
    learn = vision_learner(dls, resnet18, pretrained=False)
    learn.model.load_state_dict(demo.model.state_dict())
    assert list(dls.vocab) == [0, 1, 4, 7] and dls.valid.bs == 1
    return learn


def test_labels_win_over_indices(int_labels, demo):
    "A string names a label, also where the vocab holds numbers; an int is an index, and the warning says what was chosen"
    learn, fn = int_labels, int_labels.dls.valid_ds.items[0]
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        assert learn.explain(fn, targets='7').targets.tolist() == [3]
        assert learn.explain(fn, targets=['4']).targets.tolist() == [2]
        pred = str(learn.dls.vocab[learn.explain(fn).preds[0].argmax()])
        other = next(l for l in ('0', '1', '4', '7') if l != pred)
        assert f'map for {other}' in learn.show_cam(fn, target=other, layer='0.6').get_title()  # a label, looked up once, not read again as an index
    with pytest.warns(UserWarning, match=r"targets=2 is read as the class index 2, whose label is '4'\. .*a string is always a label"):
        assert learn.explain(fn, targets=2).targets.tolist() == [2]
    with pytest.raises(IndexError, match=r"Class index 7 is out of range.*the label '7' is class 3: pass it as a string, '7'"): learn.explain(fn, targets=7)
    with pytest.raises(ValueError, match=r"Unknown label '9'"): learn.explain(fn, targets='9')
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(learn.dls.valid_ds.items[:4], with_labels=True))
    assert interp.heatmaps([0, 1], target='7').shape == (2, 64, 64)


def test_show_cam_with_batches_of_one(int_labels):
    "DataLoaders with bs=1: the map is placed on the original (the transforms measured in one batch of two ramps)"
    fn = int_labels.dls.valid_ds.items[0]
    ax = int_labels.show_cam(fn)
    assert len(ax.get_images()) == 2
    assert input_region(int_labels, (64, 64)) == (0., 64., 0., 64.)
    assert len([a for a in int_labels.show_cams([fn, fn]).axes if a.get_images()]) == 2


def test_channels_first_arrays(demo):
    fn = demo.dls.valid_ds.items[0]
    hwc = np.asarray(Image.open(fn))
    ref = demo.heatmap(hwc)
    torch.testing.assert_close(demo.heatmap(hwc.transpose(2, 0, 1)), ref)  # (3, H, W): unambiguous, accepted
    torch.testing.assert_close(demo.heatmap(hwc.transpose(2, 0, 1).copy()), ref)
    grey = np.asarray(Image.open(fn).convert('L'))
    torch.testing.assert_close(demo.heatmap(grey[None]), demo.heatmap(grey))  # (1, H, W)
    with pytest.raises(ValueError, match=r"shape \(3, 8, 3\) could be channels first \(C, H, W\) or channels last \(H, W, C\)"): demo.heatmap(np.zeros((3, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"should be \(H, W\) for grey, or \(H, W, C\)"): demo.heatmap(np.zeros((5, 64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"should be \(H, W\) for grey, or \(H, W, C\)"): demo.heatmap(np.zeros((64, 64, 2), np.uint8))


@pytest.fixture(scope='module')
def truncated(demo, tmp_path_factory):
    "A PNG cut in half: its header reads, its pixels do not"
    d = tmp_path_factory.mktemp('truncated')
    for lbl in ('0', '1'): (d/lbl).mkdir()
    good = [Path(shutil_copy(f, d/f.parent.name/f.name)) for f in demo.dls.valid_ds.items if f.parent.name in '01'][:2]
    data = good[0].read_bytes()
    cut = d/'1'/'cut.png'
    cut.write_bytes(data[:len(data) // 2])
    with Image.open(cut) as im: im.size  # the header is fine
    return good, cut


def shutil_copy(a, b):
    import shutil
    return shutil.copy(a, b)


def test_truncated_file_named_everywhere(demo, truncated, tmp_path, capsys):
    good, cut = truncated
    name = r"'.*cut\.png'"
    for f in (lambda: demo.heatmap([good[0], cut]), lambda: demo.explain(cut), lambda: demo.show_cam(cut), lambda: demo.show_cams([good[0], cut]),
              lambda: HeatmapInterpretation.from_learner(demo, dl=demo.dls.test_dl(good + [cut], with_labels=True))):
        with pytest.raises(ValueError, match=f"Could not read the pixels of {name}.*truncated"): f()
    later = cut.with_name('later.png')
    later.write_bytes(good[1].read_bytes())
    interp = HeatmapInterpretation.from_learner(demo, dl=demo.dls.test_dl([good[0], later], with_labels=True))
    later.write_bytes(cut.read_bytes())  # a file that broke after the losses were computed
    with pytest.raises(ValueError, match=r"Could not read the pixels of '.*later\.png'"): interp.heatmaps([1])
    later.unlink()
    pkl = tmp_path/'model.pkl'
    demo.export(pkl)
    for cmd in (['explain', str(pkl), str(cut.parent.parent), '--out', str(tmp_path/'e')], ['classes', str(pkl), str(cut.parent.parent), '--out', str(tmp_path/'c')]):
        assert main(cmd) == 1
        err = capsys.readouterr().err
        assert f'skipped {cut}' in err and 'truncated' in err, err


def test_cli_says_no_futurewarning(tmp_path):
    "fastai's use of torch.jit makes torch print a FutureWarning at import: not on every run of the command"
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}
    r = subprocess.run([sys.executable, '-m', 'fastai_heatmap.cli', '--help'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and 'Warning' not in r.stderr, r.stderr


def _multi_label_learner(demo, biases):
    "A hand-set multi-label learner on the digits: label k's logit is biases[k] plus a little of the image, so what it predicts is known"
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                       get_y=lambda f: [f.parent.name] + (['big'] if f.parent.name in '47' else []), batch_tfms=Normalize.from_stats(*imagenet_stats))
    dls = dblock.dataloaders(demo.dls.path, bs=8, num_workers=0)
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(): model[0].weight.copy_(0.1 * torch.rand(5, 3, 1, 1, generator=g)); model[0].bias.copy_(torch.tensor(biases))
    learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat())
    assert is_multilabel(learn) and list(dls.vocab) == ['0', '1', '4', '7', 'big']
    return learn


def test_cli_multilabel_one_map_per_predicted_label(demo, tmp_path):
    "The command line follows the Python API: one map per predicted label (here '0' and '4'), and a picture without a map when none is"
    learn = _multi_label_learner(demo, [3., -3., 3., -3., -3.])
    files = list(demo.dls.valid_ds.items[:2])
    pkl = tmp_path/'ml.pkl'
    learn.export(pkl)
    out = tmp_path/'out'
    assert main(['explain', str(pkl)] + [str(f) for f in files] + ['--out', str(out), '--layer', '0', '--maps']) == 0
    df = pd.read_csv(out/'predictions.csv', dtype=str)
    assert len(df) == 4 and list(df.explained) == ['0', '4'] * 2 and (df.predicted == '0;4').all()
    assert sorted(p.name for p in out.glob('*.png')) == sorted(df.heatmap) and df.heatmap.is_unique
    axs = learn.show_cam(files[0], layer='0')
    assert len(axs) == 2 and axs[0].get_title().startswith('0 (') and axs[1].get_title().startswith('4 (')  # the same labels in Python
    api = learn.heatmap(files, targets=[['0', '4']] * 2, layer='0')
    for i, f in enumerate(files):
        for j, lbl in enumerate(('0', '4')):
            row = df[(df.file == str(f)) & (df.explained == lbl)].iloc[0]
            np.testing.assert_allclose(np.load(out/Path(row.heatmap).with_suffix('.npy')), api[i, j].numpy(), atol=1e-6)
    none = _multi_label_learner(demo, [-3.] * 5)
    none.export(pkl)
    assert main(['explain', str(pkl), str(files[0]), '--out', str(tmp_path/'none')]) == 0
    df = pd.read_csv(tmp_path/'none'/'predictions.csv', dtype=str, keep_default_na=False)
    assert len(df) == 1 and df.predicted[0] == '' and df.explained[0] == '' and (tmp_path/'none'/df.heatmap[0]).exists()
