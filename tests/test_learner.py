"""Learner methods on the demo learner: items of every kind, labels, pictures, and bad input. (Outcomes of a trained network, such as
the pointing game, are tested on the pretrained weights: tests/test_pretrained.py.)"""
import warnings
import numpy as np, pandas as pd, pytest, torch
from pathlib import Path
from PIL import Image
from torch import nn
from fastai.vision.all import vision_learner, resnet18, Learner, PILImage
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, CategoryBlock
from fastai.data.core import DataLoaders
from fastai_heatmap.all import *
from conftest import model_state, assert_same_state


def test_items_and_targets(demo):
    fns = list(demo.dls.valid_ds.items[:6])
    ref = demo.heatmap(fns)
    assert ref.shape == (6, 64, 64) and ref.device == next(demo.model.parameters()).device
    torch.testing.assert_close(demo.heatmap([str(f) for f in fns]), ref)
    torch.testing.assert_close(demo.heatmap([Image.open(f) for f in fns]), ref)
    torch.testing.assert_close(demo.heatmap([PILImage.create(f) for f in fns]), ref)
    torch.testing.assert_close(demo.heatmap(fns, bs=4), ref)  # batches of 4 and 2 equal one batch of 6
    torch.testing.assert_close(demo.heatmap(fns[0]), ref[:1])  # a single item
    labels = ['0', '1', '4', '7', '7', '0']
    torch.testing.assert_close(demo.heatmap(fns, targets=labels), demo.heatmap(fns, targets=[0, 1, 2, 3, 3, 0]))
    torch.testing.assert_close(demo.heatmap(fns, targets='4'), demo.heatmap(fns, targets=2))
    torch.testing.assert_close(demo.heatmap(fns, targets=torch.tensor(2)), demo.heatmap(fns, targets=2))
    e = demo.explain(fns, targets='4')
    assert (e.targets == 2).all()


def test_show_cam(demo):
    fn = demo.dls.valid_ds.items[40]
    ax = demo.show_cam(fn, layer='0.6')
    imgs = ax.get_images()
    assert len(imgs) == 2
    np.testing.assert_allclose(imgs[1].get_array().data, demo.heatmap(fn, layer='0.6')[0].cpu().numpy(), rtol=1e-5, atol=1e-6)
    # the image underneath is the decoded one: the file's own pixels, not the normalized tensor
    np.testing.assert_allclose(imgs[0].get_array().data.astype(float), np.asarray(Image.open(fn)).astype(float), atol=1)
    # image and map share one extent: no half-pixel strip along the right and bottom edges
    assert imgs[0].get_extent() == imgs[1].get_extent() == [-0.5, 63.5, 63.5, -0.5]
    e = demo.explain(fn)
    pred = demo.dls.vocab[e.preds[0].argmax()]
    prob = e.preds[0].softmax(0).max().item()
    assert ax.get_title() == f"{pred} ({prob:.2f})\ngradcam at layer '0.6'"
    other = next(v for v in demo.dls.vocab if v != pred)
    ax = demo.show_cam(fn, target=other, layer='0.6')
    title = ax.get_title()
    assert title.startswith(f'{pred} ({prob:.2f})\nmap for {other}')
    assert imgs[1].get_alpha() == 0.6 and imgs[1].get_cmap().name == 'magma'
    fig = demo.show_cams(demo.dls.valid_ds.items[:5], layer='0.6', nrows=1)
    assert sum(len(a.get_images()) == 2 for a in fig.axes) == 5
    assert fig._suptitle.get_text() == "gradcam at layer '0.6'"
    ax = demo.show_cam(fn, colorbar=True, method='saliency')
    assert len(ax.figure.axes) == 2 and ax.get_title().endswith('saliency')


def test_items_explained_in_process(demo, monkeypatch):
    "Items are explained in-process, as `learn.predict` does it: no DataLoader workers forked per call (0.2 s each, where the engine takes 0.02 s)"
    calls, orig = [], type(demo.dls).test_dl
    def spy(self, *args, **kwargs): calls.append(kwargs); return orig(self, *args, **kwargs)
    monkeypatch.setattr(type(demo.dls), 'test_dl', spy)
    fn = demo.dls.valid_ds.items[0]
    demo.heatmap(fn); demo.show_cam(fn); demo.show_cams([fn, fn])
    assert calls and all(k.get('num_workers') == 0 for k in calls), calls


def test_small_map_warning(demo):
    "The default layer gives maps of at least 4×4; a coarser one asked for warns once per model, size and layer, naming the finer one"
    learn = vision_learner(demo.dls, resnet18, pretrained=False)  # a model of its own: nothing warned about yet
    learn.model.load_state_dict(demo.model.state_dict())
    demo = learn
    fn = demo.dls.valid_ds.items[0]
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        demo.show_cam(fn)  # the default: '0.6', 4×4
    with pytest.warns(UserWarning, match=r"2×2 maps .* layer='0.6'"): demo.show_cam(fn, layer='0')
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        demo.show_cams(demo.dls.valid_ds.items[:3], layer='0')  # once only


def test_bad_items(demo, tmp_path):
    fn = demo.dls.valid_ds.items[0]
    with pytest.raises(FileNotFoundError, match='No such image file'): demo.heatmap(tmp_path/'missing.png')
    bad = tmp_path/'corrupt.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 50)
    with pytest.raises(ValueError, match="Could not read '.*corrupt.png' as an image"): demo.heatmap([fn, bad])
    txt = tmp_path/'notes.txt'
    txt.write_text('not an image')
    with pytest.raises(ValueError, match='Could not read'): demo.show_cam(txt)
    with pytest.raises(IsADirectoryError, match='folder'): demo.heatmap(tmp_path)
    with pytest.raises(ValueError, match="Unknown label '9'"): demo.heatmap(fn, targets='9')
    with pytest.raises(IndexError, match='out of range'): demo.heatmap(fn, targets=4)
    with pytest.raises(ValueError, match='one per item'): demo.heatmap([fn, fn], targets=['0', '1', '4'])


def test_learner_state_kept(demo):
    "A frozen learner, in train mode, with gradients: everything comes back as it was, also after an error"
    learn = vision_learner(demo.dls, resnet18, pretrained=False)
    learn.model.load_state_dict(demo.model.state_dict())
    learn.freeze()
    learn.model.train()
    xb, yb = demo.dls.one_batch()
    learn.loss_func(learn.model(xb), yb).backward()
    before = model_state(learn.model)
    fn = demo.dls.valid_ds.items[0]
    learn.show_cam(fn, layer='0.6')
    learn.heatmap(demo.dls.valid_ds.items[:3], targets='1')
    with pytest.raises(ValueError): learn.heatmap(fn, method='cam')
    with pytest.raises(ValueError): learn.heatmap(fn, layer='1.4')
    assert_same_state(before, model_state(learn.model))


@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
def test_mixed_precision_learner(demo, precision):
    "fastai autocasts on CUDA only; on the CPU the maps equal the float32 learner's"
    learn = vision_learner(demo.dls, resnet18, pretrained=False)
    learn.model.load_state_dict(demo.model.state_dict())
    getattr(learn, precision)()
    fns = demo.dls.valid_ds.items[:3]
    m = learn.heatmap(fns, layer='0.6')
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, demo.heatmap(fns, layer='0.6'))


def test_not_a_vision_learner(tmp_path):
    df = pd.DataFrame({'a': np.random.randn(64), 'c': np.random.choice(['x', 'y'], 64), 'y': np.random.choice(['p', 'q'], 64)})
    dls = TabularDataLoaders.from_df(df, path=tmp_path, cat_names=['c'], cont_names=['a'], y_names='y', y_block=CategoryBlock(), procs=[Categorify], bs=16)
    tab = tabular_learner(dls, n_out=2)
    with pytest.raises(TypeError, match='tabular or text'): tab.heatmap(df.iloc[:2])
    # a sequence model over token ids: one input, but no convolution over images
    tokens = [(torch.randint(0, 20, (7,)), torch.tensor(1)) for _ in range(8)]
    text = Learner(DataLoaders.from_dsets(tokens, tokens, bs=4), nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(28, 2)),
                   loss_func=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match='tabular or text'): text.heatmap(['some text'])
    with pytest.raises(TypeError, match='tabular or text'): text.show_cam('some text')


def test_no_positive_evidence_is_said(demo):
    """A class whose only evidence is negative has an all-zero Grad-CAM map (ReLU of the weighted sum), and the picture's title
    says so rather than showing a blank map as if it were one: here class '0' scores −(mean of positive activations)"""
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 4))
    with torch.no_grad():
        model[0].weight.fill_(.02); model[0].bias.fill_(1.)       # activations that vary over the image, positive
        model[4].weight.copy_(torch.tensor([[-1., -1.], [1., 1.], [1., 0.], [0., 1.]])); model[4].bias.zero_()
    learn = Learner(demo.dls, model, loss_func=nn.CrossEntropyLoss())
    fn = demo.dls.valid_ds.items[0]
    assert learn.heatmap(fn, targets='0', layer='1').amax() == 0
    assert learn.heatmap(fn, targets='1', layer='1').amax() > 0
    assert 'no positive evidence for 0' in learn.show_cam(fn, target='0', layer='1').get_title()
    assert 'no positive evidence' not in learn.show_cam(fn, target='1', layer='1').get_title()
    # the top losses too: every map of class '0' is blank, and every panel says why
    interp = HeatmapInterpretation.from_learner(learn, dl=demo.dls.test_dl([f for f in demo.dls.valid_ds.items if f.parent.name == '0'][:6], with_labels=True))
    fig = interp.plot_top_losses(4, target='0', layer='1')
    titles = [a.get_title() for a in fig.axes if a.get_images()]
    assert len(titles) == 4 and all('no positive evidence for 0' in t for t in titles), titles
    fig = interp.plot_top_losses(3, target='both', layer='1')
    titles = [a.get_title() for a in fig.axes if a.get_images()]
    assert all('no positive evidence for 0' in t for t in titles[1::2]) and not any('evidence' in t for t in titles[::2]), titles  # the actual class '0', beside the predicted '1'


def test_no_bar(demo):
    "Work over several batches shows fastprogress's bar, and `learn.no_bar()` turns it off, as it does for fastai's own loops"
    import io, contextlib
    dl = demo.dls.test_dl(demo.dls.valid_ds.items[:24], bs=8)
    def printed(ctx):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), ctx: explain_dl(demo, dl)
        return buf.getvalue()
    assert '3/3' in printed(contextlib.nullcontext())
    assert printed(demo.no_bar()) == ''


def test_items_loaded_as_get_preds_loads_them(demo, monkeypatch):
    """Items that fill more than one batch are loaded by the `DataLoaders`' workers, as `learn.get_preds` loads a test set (giving the same maps
    as loading them in this process); one batch is loaded in this process, as `learn.predict` loads its item"""
    fs = list(demo.dls.valid_ds.items[:12])
    with demo.no_bar(): ref = explain_dl(demo, demo.dls.test_dl(fs, bs=4, num_workers=0))[0].maps
    workers, orig = [], type(demo.dls).test_dl
    def spy(self, *args, **kwargs):
        dl = orig(self, *args, **kwargs); workers.append(dl.fake_l.num_workers); return dl
    monkeypatch.setattr(type(demo.dls), 'test_dl', spy)
    monkeypatch.setattr(demo.dls.valid.fake_l, 'num_workers', 2) # a learner whose DataLoaders load with 2 workers
    with demo.no_bar(): e = demo.explain(fs, bs=4) # three batches
    assert workers == [2]
    torch.testing.assert_close(e.maps, ref)
    with demo.no_bar(): demo.explain(fs[:4], bs=4); demo.heatmap(fs[0])
    assert workers[1:] == [0, 0]
    assert items_dl(demo, fs, bs=4, num_workers=1).fake_l.num_workers == 1 # the caller's choice wins


def test_file_header_read_once(demo, monkeypatch):
    """Each file is opened once for its header (`load_item`, an `ImageFile` with `image_size`) and once for its pixels in its batch;
    `learn.show_cams` a third time, for the original it draws on. Grouping by size, and `load_item` of an `ImageFile`, read nothing again"""
    fs = list(demo.dls.valid_ds.items[:6])
    opened, orig = [], Image.open
    def spy(fp, *args, **kwargs): opened.append(str(fp)); return orig(fp, *args, **kwargs)
    monkeypatch.setattr(Image, 'open', spy)
    items = [load_item(f, demo) for f in fs]
    assert all(isinstance(o, ImageFile) and o == f and o.image_size == (64, 64) for o, f in zip(items, fs))
    assert len(opened) == len(fs)
    assert [load_item(o, demo) for o in items] == items and size_groups(demo, items) == {(64, 64): list(range(len(fs)))} and len(opened) == len(fs)
    opened.clear()
    with demo.no_bar(): demo.explain(fs)
    assert sorted(opened) == sorted(map(str, fs * 2)), opened
    opened.clear()
    import matplotlib.pyplot as plt
    with demo.no_bar(): demo.show_cams(fs)
    plt.close('all')
    assert sorted(opened) == sorted(map(str, fs * 3)), opened


def test_no_bar_for_one_batch(demo, tmp_path):
    "One batch shows no progress bar (`learn.heatmap`, `learn.show_cam`, `fastai-heatmap explain`'s loop); more than one does"
    import io, contextlib, matplotlib.pyplot as plt
    from fastai_heatmap.cli import explain_files
    fs = list(demo.dls.valid_ds.items[:6])
    def printed(f):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf): f()
        plt.close('all')
        return buf.getvalue()
    assert printed(lambda: demo.heatmap(fs)) == ''
    assert printed(lambda: demo.show_cam(fs[0])) == ''
    assert printed(lambda: explain_files(demo, fs, tmp_path/'one', bs=8)) == ''
    assert '3/3' in printed(lambda: demo.heatmap(fs, bs=2))
    assert '3/3' in printed(lambda: explain_files(demo, fs, tmp_path/'three', bs=2))
