"""The hardening matrix: each bad input is one exception of the right type, with a message that names the problem (and
usually what to do), raised before any work where it can be, and the model is left exactly as it was afterwards.
Plus the inputs that look odd but must work (a huge image, a compiled model, a function as target)."""
import resource, warnings
import numpy as np, pandas as pd, pytest, torch
from pathlib import Path
from PIL import Image
from torch import nn
from fastai.vision.all import (vision_learner, resnet18, Learner, DataBlock, ImageBlock, MaskBlock, CategoryBlock, Resize,
                               GrandparentSplitter, parent_label, get_image_files, load_learner)
from fastai.data.core import DataLoaders
from fastai_heatmap.all import *
from fastai_heatmap.cli import main
from conftest import model_state, assert_same_state


@pytest.fixture(scope='module')
def files(demo, tmp_path_factory):
    "Bad files, and good ones"
    d = tmp_path_factory.mktemp('bad')
    (d/'empty.png').write_bytes(b'')
    (d/'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
    (d/'notes.txt').write_text('not an image')
    (d/'folder').mkdir()
    good = demo.dls.valid_ds.items[0]
    return dict(dir=d, good=good, empty=d/'empty.png', corrupt=d/'corrupt.png', text=d/'notes.txt', folder=d/'folder', missing=d/'missing.png')


@pytest.fixture(scope='module')
def interp(demo): return HeatmapInterpretation.from_learner(demo)


@pytest.fixture(scope='module')
def tabular(tmp_path_factory):
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify
    df = pd.DataFrame({'a': np.random.randn(64), 'c': np.random.choice(['x', 'y'], 64), 'y': np.random.choice(['p', 'q'], 64)})
    dls = TabularDataLoaders.from_df(df, path=tmp_path_factory.mktemp('tab'), cat_names=['c'], cont_names=['a'], y_names='y',
                                     y_block=CategoryBlock(), procs=[Categorify], bs=16)
    return tabular_learner(dls, n_out=2), df


@pytest.fixture(scope='module')
def text():
    "A sequence model over token ids: one input, but no convolution over images"
    tokens = [(torch.randint(0, 20, (7,)), torch.tensor(1)) for _ in range(8)]
    return Learner(DataLoaders.from_dsets(tokens, tokens, bs=4), nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(28, 2)),
                   loss_func=nn.CrossEntropyLoss())


def _xb(demo, n=2): return demo.dls.test_dl(demo.dls.valid_ds.items[:n]).one_batch()[0]


# (id, function of the fixtures, exception type, a piece of the message)
CASES = [
    # the engine
    ('unknown method', lambda f: heatmap(f.model, f.xb, method='gradcm'), ValueError, "Unknown method 'gradcm'. Did you mean 'gradcam'"),
    ('cam on fastai default head', lambda f: heatmap(f.model, f.xb, method='cam'), ValueError, "Use method='gradcam'"),
    ('missing layer name', lambda f: heatmap(f.model, f.xb, layer='0.66'), ValueError, "no layer named '0.66'. Did you mean"),
    ('layer without spatial output', lambda f: heatmap(f.model, f.xb, layer='1.2'), ValueError, 'not a spatial'),
    ('layer not in the model', lambda f: heatmap(f.model, f.xb, layer=nn.Conv2d(3, 3, 1)), ValueError, 'not part of this model'),
    ('class -1', lambda f: heatmap(f.model, f.xb, targets=-1), IndexError, 'Class index -1 is out of range: the model has 4 outputs'),
    ('class = n_classes', lambda f: heatmap(f.model, f.xb, targets=4), IndexError, 'Class index 4 is out of range'),
    ('float target', lambda f: heatmap(f.model, f.xb, targets=1.7), TypeError, 'got the float 1.7'),
    ('bool target', lambda f: heatmap(f.model, f.xb, targets=True), TypeError, 'got a bool'),
    ('ragged targets', lambda f: heatmap(f.model, f.xb, targets=[[0, 1], [2]]), ValueError, 'ragged'),
    ('(B, 0) targets', lambda f: heatmap(f.model, f.xb, targets=torch.zeros(2, 0, dtype=torch.long)), ValueError, 'no class to explain'),
    ('targets for another batch size', lambda f: heatmap(f.model, f.xb, targets=[0, 1, 2]), ValueError, '3 classes for a batch of 2'),
    ('labels in the engine', lambda f: heatmap(f.model, f.xb, targets='7'), TypeError, 'learn.heatmap'),
    ('NaN input', lambda f: heatmap(f.model, f.xb.masked_fill(f.xb > 1, float('nan'))), ValueError, 'NaN or infinite values'),
    ('integer tensor', lambda f: heatmap(f.model, (f.xb * 50).long()), TypeError, 'float batch'),
    ('one image without batch dim', lambda f: heatmap(f.model, f.xb[0]), ValueError, r'xb[None]'),
    ('empty batch', lambda f: heatmap(f.model, f.xb[:0]), ValueError, 'empty batch'),
    ('wrong channel count', lambda f: heatmap(f.model, f.xb[:, :1]), ValueError, "takes 3-channel images, but this batch has 1"),
    ('unknown norm', lambda f: heatmap(f.model, f.xb, norm='minmax'), ValueError, "Unknown norm 'minmax'"),
    ('option of another method', lambda f: heatmap(f.model, f.xb, method='gradcam', window=8), TypeError, "Method 'gradcam' takes no option 'window'"),
    ('window larger than the image', lambda f: heatmap(f.model, f.xb, method='occlusion', window=100), ValueError, 'larger than the 64×64 image'),
    ('steps=0', lambda f: heatmap(f.model, f.xb, method='integrated_gradients', steps=0), ValueError, '`steps`'),
    ('unknown smoothing type', lambda f: heatmap(f.model, f.xb, method='eigencam', smooth='smoothgrad2'), ValueError, "Unknown smooth 'smoothgrad2'"),
    ('layer= on an input method', lambda f: heatmap(f.model, f.xb, method='saliency', layer='0.6'), ValueError, 'takes no layer'),
    ('batch_size=0', lambda f: heatmap(f.model, f.xb, method='scorecam', batch_size=0), ValueError, '`batch_size`'),
    ('unknown reduce', lambda f: heatmap(f.model, f.xb, method='saliency', reduce='median'), ValueError, "Unknown reduce 'median'"),
    ('model output is not finite', lambda f: heatmap(f.broken, f.xb), ValueError, "output has NaN or infinite values"),
    # the learner
    ('unknown label', lambda f: f.learn.heatmap(f.files['good'], targets='9'), ValueError, "Unknown label '9': this learner's labels are ['0', '1', '4', '7']"),
    ('float target (learner)', lambda f: f.learn.heatmap(f.files['good'], targets=1.7), TypeError, 'got 1.7'),
    ('bool target (learner)', lambda f: f.learn.heatmap(f.files['good'], targets=True), TypeError, 'got True'),
    ('ragged targets (learner)', lambda f: f.learn.heatmap([f.files['good']]*2, targets=[[0, 1], [2]]), ValueError, 'ragged'),
    ('empty lists of classes', lambda f: f.learn.heatmap([f.files['good']]*2, targets=[[], []]), ValueError, 'empty list of classes'),
    ('empty list', lambda f: f.learn.heatmap([]), ValueError, 'No items to explain'),
    ('tabular learner', lambda f: f.tabular[0].heatmap(f.tabular[1].iloc[:2]), TypeError, 'tabular or text'),
    ('text learner', lambda f: f.text.show_cam('some text'), TypeError, 'tabular or text'),
    ('missing file', lambda f: f.learn.heatmap(f.files['missing']), FileNotFoundError, 'No such image file'),
    ('zero-byte file', lambda f: f.learn.heatmap(f.files['empty']), ValueError, "Could not read '"),
    ('corrupt file', lambda f: f.learn.heatmap([f.files['good'], f.files['corrupt']]), ValueError, "corrupt.png' as an image"),
    ('non-image file', lambda f: f.learn.show_cam(f.files['text']), ValueError, "notes.txt' as an image"),
    ('a folder', lambda f: f.learn.heatmap(f.files['folder']), IsADirectoryError, "is a folder, not an image"),
    ('float array', lambda f: f.learn.heatmap(np.random.rand(64, 64, 3)), TypeError, 'uint8 pixels'),
    ('bs=0', lambda f: f.learn.heatmap(f.files['good'], bs=0), ValueError, '`bs` is a batch size'),
    ('sizes that clash', lambda f: f.learn.heatmap([f.files['good'], Image.new('RGB', (30, 20))]), ValueError, 'different sizes'),
    ('alpha outside [0, 1]', lambda f: f.learn.show_cam(f.files['good'], alpha=1.5), ValueError, "opacity, from 0 to 1"),
    ('unknown colour map', lambda f: f.learn.show_cam(f.files['good'], cmap='magmaa'), ValueError, "Unknown colour map 'magmaa'"),
    ('several items to show_cam', lambda f: f.learn.show_cam([f.files['good']]*2), TypeError, 'learn.show_cams'),
    # the interpretation
    ('k=0', lambda f: f.interp.plot_top_losses(0), ValueError, '1 or more'),
    ('k larger than the dataset', lambda f: f.interp.plot_top_losses(10**6), ValueError, 'only 144 items'),
    ('unknown target word', lambda f: f.interp.plot_top_losses(3, target='neither'), ValueError, "Unknown target 'neither'"),
    ('an index out of range', lambda f: f.interp.heatmaps([10**6]), IndexError, 'range(144)'),
    ('max_n=0', lambda f: f.interp.class_heatmaps(max_n=0), ValueError, '`max_n`'),
    ('class heatmaps per batch', lambda f: f.interp.class_heatmaps(norm='batch'), ValueError, "norm='batch'"),
    ('engine option refused by name', lambda f: f.interp.plot_top_losses(3, windoww=3), TypeError, "no option 'windoww'"),
    ('interpretation without data', lambda f: HeatmapInterpretation.from_learner(f.loaded), ValueError, 'dl=learn.dls.test_dl(files, with_labels=True)'),
]


class _F:
    "What the cases run on"
    def __init__(self, **kw): self.__dict__.update(kw)


@pytest.fixture(scope='module')
def fx(demo, files, interp, tabular, text, tmp_path_factory):
    broken = vision_learner(demo.dls, resnet18, pretrained=False).model
    broken.load_state_dict(demo.model.state_dict())
    with torch.no_grad(): broken[1][-1].weight.fill_(float('nan'))
    pkl = tmp_path_factory.mktemp('pkl')/'model.pkl'
    demo.export(pkl)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = load_learner(pkl)
    return _F(model=demo.model, xb=_xb(demo), learn=demo, files=files, interp=interp, tabular=tabular, text=text, broken=broken.eval(), loaded=loaded)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input(fx, case):
    _, fn, exc, msg = case
    before = model_state(fx.model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        with pytest.raises(exc) as info: fn(fx)
    assert msg in str(info.value), str(info.value)
    assert_same_state(before, model_state(fx.model))


def test_segmentation_learner(demo, tmp_path):
    "A segmentation learner is interpreted (not `AttributeError: vocab`: its codes are read from the MaskBlock); what needs a class per image says it is for classifiers (its top losses: tests/test_task_interpret.py)"
    path = demo.dls.path
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['bg', 'digit'])), get_items=lambda p: get_image_files(p/'train')[:8] + get_image_files(p/'valid')[:8],
                       get_y=lambda f: np.zeros((64, 64), dtype=np.uint8), splitter=GrandparentSplitter())
    from fastai.vision.all import unet_learner
    seg = unet_learner(dblock.dataloaders(path, bs=4, num_workers=0), resnet18, pretrained=False, n_out=2)
    interp = HeatmapInterpretation.from_learner(seg)
    assert interp.vocab == ['bg', 'digit'] and len(interp.losses) == 8
    with pytest.raises(TypeError, match='for classifiers; this is a segmentation learner'): interp.class_heatmaps()


def test_cli_bad_usage(demo, files, tmp_path, capsys):
    "Bad usage: one line on stderr naming the flag, exit status 2, before the model is loaded; never a traceback"
    pkl = tmp_path/'model.pkl'
    demo.export(pkl)
    good = str(files['good'])
    (tmp_path/'a_file').write_text('x')
    cases = [(['--out', str(tmp_path/'a_file')], 'is a file'), (['--out', '/proc/nope/out'], 'cannot be created'),
             (['--out', str(tmp_path/'o'), '--bs', '0'], '--bs'), (['--out', str(tmp_path/'o'), '--bs', '-1'], '--bs'),
             (['--out', str(tmp_path/'o'), '--cmap', 'nope'], '--cmap'), (['--out', str(tmp_path/'o'), '--method', 'gradcm'], "--method: Unknown method"),
             (['--out', str(tmp_path/'o'), '--alpha', '2'], '--alpha'), (['--out', str(tmp_path/'o'), '--layer', '0.66'], "no layer named '0.66'")]
    for extra, msg in cases:
        assert main(['explain', str(pkl), good] + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith('fastai-heatmap: error:') and msg in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert main(['explain', str(tmp_path/'nope.pkl'), good, '--out', str(tmp_path/'o')]) == 2
    assert main(['explain', str(pkl), str(tmp_path/'no_such_folder'), '--out', str(tmp_path/'o')]) == 2
    assert 'No such file or folder' in capsys.readouterr().err
    assert not (tmp_path/'o'/'predictions.csv').exists()  # nothing written on bad usage


# ---------------------------------------------------------------------------------------------- odd but fine
_BIG = """
import resource, sys, numpy as np, torch
from pathlib import Path
from PIL import Image
from fastai.vision.all import DataBlock, ImageBlock, CategoryBlock, Resize, GrandparentSplitter, parent_label, get_image_files, vision_learner, resnet18
from fastai_heatmap.all import *
data, files = Path(sys.argv[1]), sys.argv[2:]
dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'),
                get_y=parent_label, item_tfms=Resize(64)).dataloaders(data, bs=16, num_workers=0)
learn = vision_learner(dls, resnet18, pretrained=False)
learn.heatmap(dls.valid_ds.items[:2])  # everything but the photos warmed up: the peak so far
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = learn.heatmap(files)
assert m.shape == (len(files), 64, 64) and torch.isfinite(m).all()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""

def test_huge_image_is_resized(demo, tmp_path):
    """Eight 4000×3000 photos through a learner that resizes: explained at the learner's size, with memory bounded by about one
    decoded photo (36 MB; all eight at once would be 288 MB, as floats 1.1 GB). Measured in a fresh process, whose peak resident
    memory (`ru_maxrss`, which never goes down) before the photos is that of everything else, warmed up"""
    import subprocess, sys
    big = tmp_path/'big.jpg'
    Image.fromarray(np.random.randint(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(big, quality=70)
    r = subprocess.run([sys.executable, '-c', _BIG, str(demo.dls.path)] + [str(big)]*8, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    grown_mb = float(r.stdout.strip().splitlines()[-1])
    assert grown_mb < 150, grown_mb


def test_compiled_model(demo):
    "A `torch.compile`d model is explained through its original module (nothing is compiled)"
    xb = _xb(demo)
    ref = heatmap(demo.model, xb)
    torch.testing.assert_close(heatmap(torch.compile(demo.model), xb), ref)
    learn = vision_learner(demo.dls, resnet18, pretrained=False)
    learn.model.load_state_dict(demo.model.state_dict())
    learn.model = torch.compile(learn.model)
    torch.testing.assert_close(learn.heatmap(demo.dls.valid_ds.items[:2]), ref)


def test_function_targets(demo):
    "A function of the predictions works through the learner as in the engine"
    fns = demo.dls.valid_ds.items[:3]
    worst = lambda p: p.argmin(1)
    torch.testing.assert_close(demo.heatmap(fns, targets=worst), heatmap(demo.model, _xb(demo, 3), targets=worst))


def test_ambiguous_int_targets_warn(demo):
    "Labels that are numbers make an int ambiguous: it is an index, and a warning says so"
    fn = demo.dls.valid_ds.items[0]
    with pytest.warns(UserWarning, match="targets=2 is read as the class index 2, whose label is '4'"): demo.heatmap(fn, targets=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        demo.heatmap(fn, targets=1)  # index 1 is label '1': nothing ambiguous
        demo.heatmap(fn, targets='4')


@pytest.mark.parametrize('arch,layer', [('densenet121', 'features'), ('resnet18', 'layer4.1.bn2')])
def test_cam_refused_where_later_ops_change_the_layer_output(arch, layer):
    """CAM reads the layer's own output: densenet121's 'features' is followed by an in-place ReLU before its pooling, and
    resnet18's 'layer4.1.bn2' by the residual sum and a ReLU, so CAM's head check fails there and says so (instead of the CAM
    of the altered tensor); Grad-CAM, which needs no head, explains the same layer, and the model is left as it was"""
    import torchvision
    model = getattr(torchvision.models, arch)(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = model_state(model)
    with pytest.raises(ValueError) as info: heatmap(model, x, method='cam', layer=layer)
    msg = str(info.value)
    assert "own activations" in msg and "Use method='gradcam'" in msg and 'proportional' not in msg, msg
    m = heatmap(model, x, method='gradcam', layer=layer)
    assert m.shape == (2, 64, 64) and torch.isfinite(m).all()
    assert_same_state(before, model_state(model))
