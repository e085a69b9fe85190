"""The audit report (nbs/04b_report.ipynb, `fastai-heatmap report`): built on real models (the demo's digits learner and the
ImageNet-pretrained network), checked offline (every <img> resolves, nothing from outside the page), opened in headless
Chromium at a laptop's and a phone's width (no console error, every picture drawn, nothing wider than the screen; the
screenshots are saved for a person to look at), a planted shortcut flagged on a model with fixed weights, and 2 processes
under torchrun giving the numbers of 1."""
import base64, io, json, os, re, shutil, subprocess, sys, signal, warnings
from html.parser import HTMLParser
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from torch import nn
from PIL import Image
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai_heatmap.all import *
from fastai_heatmap.report import model_report, Tally, tally_dl
from fastai_heatmap.cli import main

warnings.filterwarnings('ignore', category=UserWarning)
ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT/'docs'))
from browser import chromium, have_browser, wait_loaded  # noqa: E402
SHOTS = Path(os.environ.get('REPORT_SHOTS', ROOT/'_report_shots'))
LIMIT = 400


class _Refs(HTMLParser):
    "Every attribute of every tag, and the tags"
    def __init__(self):
        super().__init__(); self.tags, self.attrs = [], []
    def handle_starttag(self, tag, attrs):
        self.tags.append(tag); self.attrs += [(tag, k, v or '') for k, v in attrs]


def check_offline(fn: Path):
    "Every <img> resolves (an embedded picture that decodes, or a file beside the page), nothing refers outside the page"
    page = fn.read_text(encoding='utf-8')
    p = _Refs(); p.feed(page)
    assert 'script' not in p.tags and 'link' not in p.tags and 'iframe' not in p.tags and 'object' not in p.tags
    assert '@import' not in page and 'url(' not in page and '@font-face' not in page
    imgs = [v for t, k, v in p.attrs if t == 'img' and k == 'src']
    assert imgs, 'no picture'
    for src in imgs:
        if src.startswith('data:'):
            head, data = src.split(',', 1)
            assert head in ('data:image/jpeg;base64', 'data:image/png;base64')
            Image.open(io.BytesIO(base64.b64decode(data))).load()
        else:
            assert not re.match(r'^[a-z]+:', src) and (fn.parent/src).is_file(), src
    for t, k, v in p.attrs:
        if k in ('href', 'src', 'srcset', 'poster', 'action') and not v.startswith(('data:', '#')): pytest.fail(f'<{t} {k}="{v[:80]}"> leaves the page')
    assert not re.search(r'https?://', re.sub(r'data:[^"]+', '', page)), 'an address outside the page'
    for cap in re.findall(r'<figure>.*?<figcaption>(.*?)</figcaption></figure>', page, re.S):  # each figure says method, layer and sizes
        assert re.search(r'maps on \d+×\d+ images', cap) and ('at layer' in cap or 'saliency' in cap), cap
    return page


def in_browser(fn: Path, name: str):
    "The page at a laptop's and a phone's width: no console error, every picture drawn, nothing wider than the screen; a screenshot of each"
    if not have_browser(): pytest.skip('no chromium/chromedriver (apt-get install -y chromium chromium-driver)')
    pytest.importorskip('selenium')
    SHOTS.mkdir(exist_ok=True)
    for w, h, label in ((1280, 900, 'laptop'), (390, 844, 'phone')):
        with chromium(w, h) as drv:
            drv.get(fn.resolve().as_uri())
            wait_loaded(drv, 30)
            errors = [e for e in drv.get_log('browser') if e.get('level') in ('SEVERE', 'ERROR')]
            assert not errors, errors
            bad = drv.execute_script("return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)")
            assert not bad, bad
            assert drv.execute_script("return performance.getEntriesByType('resource').filter(e => !e.name.startsWith('data:')).length") == 0
            assert drv.execute_script("return document.documentElement.scrollWidth") <= w, f'wider than a {w}-pixel screen'
            # text columns left-aligned, numbers right-aligned (the per-class table and the confused pairs)
            align = drv.execute_script("""return Object.fromEntries(['classes', 'confused', 'uncertain'].flatMap(s => Array.from(document.querySelectorAll(`#${s} .scroll table`)).flatMap(t =>
                Array.from(t.querySelectorAll('thead th')).map((h, i) => [s + '.' + h.textContent, [getComputedStyle(h).textAlign,
                    ...new Set(Array.from(t.querySelectorAll(`tbody tr > :nth-child(${i + 1})`)).map(c => getComputedStyle(c).textAlign))]]))))""")
            for col in ('classes.class', 'classes.flagged', 'confused.actual', 'confused.predicted'):
                if col in align: assert align[col] == ['left', 'left'], (col, align[col])
            for col in ('classes.n', 'classes.border_share', 'classes.agreement', 'confused.n'):
                if col in align: assert align[col] == ['right', 'right'], (col, align[col])
            assert 'classes.class' in align and 'classes.n' in align, align
            # a table wider than the screen scrolls in its box (the page does not)
            boxes = drv.execute_script("""return Array.from(document.querySelectorAll('.scroll')).map(b => {
                const wide = b.scrollWidth > b.clientWidth; b.scrollLeft = 10000; return [b.clientWidth, wide, b.scrollLeft]})""")
            assert all(cw <= w for cw, _, _ in boxes) and all(left > 0 for _, wide, left in boxes if wide), boxes
            if label == 'phone': assert any(wide for _, wide, _ in boxes), 'no table wider than a phone: the scrolling is not tested'
            drv.execute_script("document.querySelectorAll('.scroll').forEach(b => b.scrollLeft = 0)")
            drv.set_window_size(w, min(12000, drv.execute_script("return document.body.scrollHeight") + 50))
            wait_loaded(drv, 30)
            drv.save_screenshot(str(SHOTS/f'{name}_{label}.png'))


@pytest.fixture(scope='module')
def digits(demo, tmp_path_factory):
    "The exported demo learner and the validation images of the digits in their class folders"
    d = tmp_path_factory.mktemp('report')
    demo.export(d/'digits.pkl')
    for f in demo.dls.valid_ds.items:
        (d/'valid'/f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d/'valid'/f.parent.name/f.name)
    return d


@pytest.mark.timeout(LIMIT)
def test_report_in_python_offline_and_in_browser(demo, tmp_path, capsys):
    "`interp.report`: the page's sections and numbers, offline and in Chromium; silent with bar=False"
    interp = HeatmapInterpretation.from_learner(demo)
    capsys.readouterr()
    rep = interp.report(tmp_path/'report.html', k=6, faith_n=6, sanity_n=2, bar=False)
    assert capsys.readouterr().out == ''
    page = check_offline(tmp_path/'report.html')
    for sid in ('run', 'accuracy', 'classes', 'confused', 'top-losses', 'faithfulness', 'sanity'): assert f'<section id="{sid}">' in page
    n = len(demo.dls.valid_ds)
    assert rep.run['images'] == n and rep.run['layer'] == '0.6' and rep.run['method'] == 'gradcam'
    assert rep.classes['n'].sum() == n and rep.confusion.values.sum() == n
    preds, targs = demo.get_preds(dl=interp.dl)[:2]
    assert rep.accuracy == pytest.approx(float((preds.argmax(1) == targs).float().mean()))
    assert (rep.confusion.values == interp.confusion_matrix()).all()
    # the top losses are interp's, largest first
    top = interp.top_losses(6)[0]
    assert np.allclose(rep.top_losses.loss.values, top.numpy(), atol=1e-4)
    # per class: the border share of the class heatmaps
    ch = interp.class_heatmaps()
    assert np.allclose(rep.classes.border_share.values, ch.border_mass.numpy(), atol=1e-3)
    assert list(rep.faithfulness.method) == ['gradcam', 'gradcam++', 'saliency', 'random'] and (rep.faithfulness.n == 6).all()
    assert rep.verdict.split(':')[0] in ('passed', 'failed') and rep.verdict.split(':')[0] in page.lower()
    in_browser(tmp_path/'report.html', 'digits')


def _cue_model():
    """A fixed-weight CNN with a shortcut built in: '7' is read off near-white pixels (the stripe `make_digits(cue=7)` puts
    on every 7, and white ink), the other classes off dark ink, wherever the digit is"""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_(); conv.bias.zero_()
        # inputs normalized with ImageNet statistics: brightness in [0, 1] is Σ_c (x_c σ_c + μ_c) / 3
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        conv.weight[0, :, 0, 0] = std / 3 * 20; conv.bias[0] = (mean.sum() / 3 - 0.92) * 20    # bright: 20 (b − 0.92)
        conv.weight[1, :, 0, 0] = -std / 3 * 20; conv.bias[1] = (0.15 - mean.sum() / 3) * 20   # dark: 20 (0.15 − b)
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0., 1.], [0., 1.], [0., 1.], [40., 0.]])); lin.bias.copy_(torch.tensor([0., -.01, -.02, 0.]))
    return nn.Sequential(nn.Sequential(conv, nn.ReLU()), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin))


@pytest.mark.timeout(LIMIT)
def test_planted_shortcut_flagged(tmp_path):
    "On the digits with a stripe on every 7, a model that reads 7 off the stripe: 7 flagged (border and one place), no other class"
    dls = digits_dls(make_digits(cue=7))
    learn = Learner(dls, _cue_model(), loss_func=CrossEntropyLossFlat())
    assert learn.dls.vocab[3] == '7'
    rep = HeatmapInterpretation.from_learner(learn).report(tmp_path/'r.html', k=4, faith_n=4, sanity_n=2, bar=False)
    assert rep.flagged == ['7'], rep.classes
    why = rep.classes.set_index('class').flagged['7']
    assert 'border' in why and 'one place' in why
    page = check_offline(tmp_path/'r.html')
    tile = re.search(r'<figure class="tile flag">.*?</figure>', page, re.S).group(0)
    assert 'alt="mean map of class 7"' in tile and '⚑' in tile
    assert page.count('<figure class="tile flag">') == 1
    assert '1 class flagged as a likely shortcut: 7.' in page
    # the same model without the stripe's class being special: nothing flagged
    with torch.no_grad(): learn.model[1][2].weight[3] = torch.tensor([0., 1.])
    assert HeatmapInterpretation.from_learner(learn).report(None, k=4, faith_n=0, sanity_n=0, bar=False).flagged == []


def test_tally_memory_is_flat(demo):
    "What a pass keeps does not grow with the number of images: the sums' sizes are the same for 16 and 144 images, plus 4 numbers per image"
    files = demo.dls.valid_ds.items
    a, b = (tally_dl(demo, demo.dls.test_dl(files[:n], with_labels=True)) for n in (16, len(files)))
    size = lambda t: sum(x.numel() for x in (t.maps, t.units, t.imgs, t.counts, t.nonzero, t.confusion))
    assert size(a) == size(b) and a.maps.shape == (4, 64, 64)
    assert len(a.rows) == len(b.rows) == 1 and b.rows[0].shape == (len(files), 4)
    assert a.counts.sum() == 16 and b.counts.sum() == len(files)


@pytest.mark.timeout(LIMIT)
def test_cli_report_labelled_unlabelled_compare(digits, tmp_path, capsys):
    "`fastai-heatmap report` on a labelled folder, an unlabelled one and with --compare; bad usage is one line and status 2"
    d = digits
    (d/'valid'/'7'/'zzz_broken.png').write_bytes(b'not a png')
    try: rc = main(['report', str(d/'digits.pkl'), str(d/'valid'), '--out', str(tmp_path/'r'), '--faith-n', '4', '--k', '4'])
    finally: (d/'valid'/'7'/'zzz_broken.png').unlink()
    out = capsys.readouterr()
    assert rc == 1 and 'zzz_broken.png' in out.err and 'Report on 144 images (accuracy' in out.out
    nums = json.loads((tmp_path/'r'/'report.json').read_text())
    assert nums['run']['labelled'] and nums['run']['images'] == 144 and nums['accuracy'] is not None
    check_offline(tmp_path/'r'/'report.html')
    flat = tmp_path/'flat'; flat.mkdir()
    for f in sorted((d/'valid').rglob('*.png'))[::12]: shutil.copy(f, flat/f'{f.parent.name}_{f.name}')
    assert main(['report', str(d/'digits.pkl'), str(flat), '--out', str(tmp_path/'u'), '--faith-n', '2', '--k', '3']) == 0
    page = check_offline(tmp_path/'u'/'report.html')
    assert '<section id="uncertain">' in page and '<section id="accuracy">' not in page
    assert json.loads((tmp_path/'u'/'report.json').read_text())['accuracy'] is None
    assert main(['report', str(d/'digits.pkl'), str(d/'valid'), '--out', str(tmp_path/'c'), '--compare', str(d/'digits.pkl'), '--faith-n', '0', '--k', '3']) == 0
    nums = json.loads((tmp_path/'c'/'report.json').read_text())
    assert nums['compare']['rank_corr_mean'] == pytest.approx(1.0, abs=1e-5) and nums['compare']['accuracy'] == nums['accuracy']  # a model against itself
    check_offline(tmp_path/'c'/'report.html')
    capsys.readouterr()
    for args, msg in ((['--k', '0'], '--k'), (['--faith-n', '-1'], '--faith-n'), (['--compare', str(tmp_path/'nope.pkl')], '--compare'), (['--method', 'nope'], '--method')):
        assert main(['report', str(d/'digits.pkl'), str(d/'valid'), '--out', str(tmp_path/'x'), *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and 'Traceback' not in err and err.count('\n') == 1, err
    assert main(['report', str(d/'digits.pkl'), str(tmp_path/'nothing'), '--out', str(tmp_path/'x')]) == 2


@pytest.mark.timeout(LIMIT)
def test_report_on_the_pretrained_network(tmp_path):
    "The ImageNet-pretrained network (fixed weights) on photos without labels, through the command line: offline, in Chromium"
    pre = pytest.importorskip('fastai_heatmap.pretrained')
    learn = pre.imagenet_learner()
    learn.export(tmp_path/'imagenet.pkl')
    photos = tmp_path/'photos'; photos.mkdir()
    for name, f in pre.sample_photos().items(): Image.open(f).convert('RGB').save(photos/f'{name}.png')
    assert main(['report', str(tmp_path/'imagenet.pkl'), str(photos), '--out', str(tmp_path/'r'), '--faith-n', '2', '--k', '6']) == 0
    nums = json.loads((tmp_path/'r'/'report.json').read_text())
    assert not nums['run']['labelled'] and nums['run']['images'] == len(pre.sample_photos()) and len(nums['run']['classes']) == 1000
    page = check_offline(tmp_path/'r'/'report.html')
    assert 'The confusion matrix' not in page and '<section id="uncertain">' in page
    in_browser(tmp_path/'r'/'report.html', 'imagenet_photos')


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
               MPLBACKEND='Agg', ACCELERATE_USE_CPU='1', CUDA_VISIBLE_DEVICES='', PYTHONWARNINGS='ignore')
    return env


@pytest.mark.timeout(LIMIT + 200)
def test_two_processes_equal_one(digits, tmp_path):
    "`fastai-heatmap report` by 2 processes under torchrun: the numbers of 1 process"
    pytest.importorskip('accelerate')
    d, args = digits, ['--faith-n', '6', '--k', '5']
    assert main(['report', str(d/'digits.pkl'), str(d/'valid'), '--out', str(tmp_path/'one'), *args]) == 0
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(29700 + os.getpid() % 500),
           '-m', 'fastai_heatmap.cli', 'report', str(d/'digits.pkl'), str(d/'valid'), '--out', str(tmp_path/'two'), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, start_new_session=True)
    try: out, err = p.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); out, err = p.communicate()
        pytest.fail(f'torchrun ran past {LIMIT} s\n{out}\n{err[-3000:]}')
    assert p.returncode == 0, err[-3000:]
    assert out.count('Report on 144 images') == 1 and 'by 2 processes' in out, out
    one, two = (json.loads((tmp_path/k/'report.json').read_text()) for k in ('one', 'two'))
    assert two['run']['processes'] == 2 and one['run']['processes'] == 1
    assert one['accuracy'] == two['accuracy'] and one['confusion'] == two['confusion'] and one['flagged'] == two['flagged']
    c1, c2 = (pd.DataFrame(**{k: v for k, v in o['classes'].items() if k != 'index'}) for o in (one, two))
    assert (c1['n'] == c2['n']).all() and (c1['flagged'] == c2['flagged']).all()
    assert np.allclose(c1[['border_share', 'agreement']].values.astype(float), c2[['border_share', 'agreement']].values.astype(float), atol=1e-4)
    t1, t2 = (pd.DataFrame(**{k: v for k, v in o['top_losses'].items() if k != 'index'}) for o in (one, two))
    assert list(t1['item']) == list(t2['item']) and np.allclose(t1['loss'], t2['loss'], atol=1e-4)
    f1, f2 = (pd.DataFrame(**{k: v for k, v in o['faithfulness'].items() if k != 'index'}) for o in (one, two))
    assert np.allclose(f1[['deletion', 'insertion']].values.astype(float), f2[['deletion', 'insertion']].values.astype(float), atol=1e-4)
    assert one['sanity'] == two['sanity'] and one['verdict'] == two['verdict']
    check_offline(tmp_path/'two'/'report.html')
