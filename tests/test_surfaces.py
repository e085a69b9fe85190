"""Every registered method through every surface a user reaches it by: `learn.heatmap`, `learn.show_cam(s)`,
`HeatmapInterpretation` (top losses, heatmaps, class and confusion heatmaps) and `fastai-heatmap explain --method`, on
the demo learner, with the model unchanged afterwards. The list comes from the registry."""
import warnings
import pandas as pd, pytest, torch
import matplotlib.pyplot as plt
from fastai_heatmap.all import *
from fastai_heatmap.cli import main
from conftest import model_state, assert_same_state, fast_options

warnings.filterwarnings('ignore', category=UserWarning)


@pytest.fixture(scope='module')
def interps(demo, mislabeled): return HeatmapInterpretation.from_learner(demo), HeatmapInterpretation.from_learner(demo, dl=mislabeled)


@pytest.fixture(scope='module')
def pkl(demo, tmp_path_factory):
    p = tmp_path_factory.mktemp('export')/'model.pkl'
    demo.export(p)
    return p


def _cells(fig): return [a for a in fig.axes if a.get_images()]


@pytest.mark.parametrize('name', method_names())
def test_every_surface(demo, interps, pkl, tmp_path, name):
    interp, confused = interps
    fns = demo.dls.valid_ds.items[:2]
    opts = fast_options(name)
    before = model_state(demo.model)
    if name == 'cam':  # fastai's default head is not pooling → Linear: refused clearly everywhere
        with pytest.raises(ValueError, match="Use method='gradcam'"): demo.heatmap(fns, method=name)
        assert main(['explain', str(pkl), str(fns[0]), '--out', str(tmp_path), '--method', name]) == 2
        assert_same_state(before, model_state(demo.model))
        return
    m = demo.heatmap(fns, method=name, **opts)
    assert m.shape == (2, 64, 64) and m.device == next(demo.model.parameters()).device
    ax = demo.show_cam(fns[0], method=name, **opts)
    assert len(ax.get_images()) == 2 and name in ax.get_title()
    assert len(_cells(demo.show_cams(fns, method=name, **opts))) == 2
    assert len(_cells(interp.plot_top_losses(2, method=name, **opts))) == 2
    assert interp.heatmaps([0, 1], target='both', method=name, **opts).shape == (2, 2, 64, 64)
    assert interp.class_heatmaps(method=name, max_n=1, **opts).counts.tolist() == [1, 1, 1, 1]
    assert len(_cells(confused.plot_confused_heatmaps(method=name, max_pairs=1, **opts))) == 2
    assert main(['explain', str(pkl), str(fns[0]), '--out', str(tmp_path), '--method', name]) == 0  # the method's default options
    assert len(pd.read_csv(tmp_path/'predictions.csv')) == 1
    assert_same_state(before, model_state(demo.model))
    plt.close('all')


def test_multilabel_show_cam(demo):
    "A multi-label learner: one map per predicted label, or a note that it predicts none"
    from fastai.vision.all import DataBlock, ImageBlock, MultiCategoryBlock, GrandparentSplitter, get_image_files, vision_learner, resnet18, Normalize, imagenet_stats
    dblock = DataBlock(blocks=(ImageBlock, MultiCategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(),
                       get_y=lambda f: [f.parent.name] + (['big'] if f.parent.name in '47' else []), batch_tfms=Normalize.from_stats(*imagenet_stats))
    ml = vision_learner(dblock.dataloaders(demo.dls.path, bs=64, num_workers=0), resnet18, pretrained=False)
    fn = demo.dls.valid_ds.items[0]
    probs = ml.loss_func.activation(ml.explain(fn).preds)[0]
    thresh = ml.loss_func.thresh
    n_pos = int((probs > thresh).sum())
    res = ml.show_cam(fn)
    axs = res if isinstance(res, list) else [res]
    if n_pos == 0: assert len(axs) == 1 and 'no label predicted' in axs[0].get_title()
    else: assert len(axs) == n_pos
    ml.loss_func.thresh = 0.0  # every label predicted: a map for each
    axs = ml.show_cam(fn)
    assert len(axs) == len(ml.dls.vocab) and [a.get_title().split(' ')[0] for a in axs] == list(ml.dls.vocab)
    ml.loss_func.thresh = 1.0  # none
    ax = ml.show_cam(fn)
    assert 'no label predicted' in ax.get_title()
    plt.close('all')


def test_cli_output_when_piped(demo, pkl, tmp_path, capsys):
    "Not on a terminal: no progress bar characters on stdout or stderr, skipped files reported on lines of their own"
    (tmp_path/'bad.png').write_bytes(b'nope')
    fns = [str(f) for f in demo.dls.valid_ds.items[:70]] + [str(tmp_path/'bad.png')]
    assert main(['explain', str(pkl), *fns, '--out', str(tmp_path/'out'), '--bs', '16']) == 1
    out, err = capsys.readouterr()
    assert '█' not in out + err and '|' not in out
    assert out.strip() == f"Wrote 70 heatmaps and predictions.csv to {tmp_path/'out'}; 1 file(s) failed"
    assert err.splitlines()[0].startswith(f"skipped {tmp_path/'bad.png'}: ")
    df = pd.read_csv(tmp_path/'out'/'predictions.csv')
    assert list(df.file) == sorted(df.file)


def test_cli_demo_output_when_piped(demo, tmp_path, capsys):
    "`fastai-heatmap demo` not on a terminal: its numbers and files, no progress bar, and fastai's defaults as they were"
    from fastcore.basics import defaults
    before = list(defaults.callbacks)
    assert main(['demo', '--cached', '--out', str(tmp_path/'demo')]) == 0
    out, err = capsys.readouterr()
    assert '█' not in out + err and '[0/' not in out + err, (out + err)[:300]
    assert 'validation accuracy' in out and (tmp_path/'demo'/'class_heatmaps.png').exists()
    assert defaults.callbacks == before
