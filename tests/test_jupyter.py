"""In a real Jupyter kernel (ipykernel, driven through jupyter_client), with `%matplotlib inline`, the calls of the README and
the tutorial typed as a user types them, without `;`: what each cell displays is counted — one picture per drawing call,
no dump of tensors, no warning text (issue 20)"""
import os, re, queue
import pytest

jupyter_client = pytest.importorskip('jupyter_client')
pytest.importorskip('ipykernel')

pytestmark = pytest.mark.timeout(1800)


class Kernel:
    "A python3 kernel started with the test's environment (so that it imports this tree), `%matplotlib inline` as in Jupyter"
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'} # Jupyter's own backend, not the tests' Agg
        self.km = jupyter_client.KernelManager(kernel_name='python3')
        self.km.start_kernel(env=env)
        self.kc = self.km.client(); self.kc.start_channels(); self.kc.wait_for_ready(timeout=120)

    def run(self, code:str, timeout:float=900)->dict:
        "Execute `code` as one cell; what it displayed: pictures, plain texts, HTML, stream text, progress bars, and the error"
        mid = self.kc.execute(code)
        out = dict(images=0, widgets=0, texts=[], html=[], streams='', bars=0, bar_updates=0, error=None)
        while True:
            try: msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty: raise TimeoutError(f"The kernel did not finish {code!r} in {timeout} s") from None
            if msg['parent_header'].get('msg_id') != mid: continue
            t, c = msg['msg_type'], msg['content']
            if t in ('display_data', 'execute_result', 'update_display_data'):
                data = c['data']
                if t == 'update_display_data': out['bar_updates'] += 1
                elif any(k.startswith('image/') for k in data): out['images'] += 1
                elif 'application/vnd.jupyter.widget-view+json' in data: out['widgets'] += 1
                elif 'text/html' in data and '<progress' in data['text/html']: out['bars'] += 1
                elif 'text/html' in data: out['html'].append(data['text/html']); out['images'] += data['text/html'].count('<img')
                else: out['texts'].append(data.get('text/plain', ''))
            elif t == 'stream': out['streams'] += c['text']
            elif t == 'error': out['error'] = f"{c['ename']}: {c['evalue']}"
            elif t == 'status' and c['execution_state'] == 'idle': break
        reply = self.kc.get_shell_msg(timeout=60)
        assert out['error'] is None, out['error'] + '\n' + '\n'.join(reply['content'].get('traceback', []))
        return out

    def close(self):
        self.kc.stop_channels(); self.km.shutdown_kernel(now=True)


@pytest.fixture(scope='module')
def kernel():
    k = Kernel()
    k.run("%matplotlib inline\nimport warnings\nfrom fastai.vision.all import *\nfrom fastai_heatmap.all import *")
    # the demo's data and network; seeded, untrained weights: what a cell displays does not depend on what the model learned, and no training runs
    k.run("set_seed(0)\nlearn = vision_learner(digits_dls(), resnet18, pretrained=False, metrics=accuracy)\n"
          "fns = learn.dls.valid_ds.items\nseven = [f for f in fns if f.parent.name == '7'][0]")
    yield k
    k.close()


TENSOR_DUMP = re.compile(r'tensor\(\[|TensorImage\(\[|array\(\[\[|e[-+]0\d,')

def quiet(out, images=1):
    "`images` pictures, and nothing else: no text value, no tensor dump, no warning"
    assert out['images'] == images, out
    assert not out['texts'], out['texts']
    assert not out['streams'].strip(), out['streams'] # warnings go to stderr, a stream
    for h in out['html']: assert not TENSOR_DUMP.search(h), h[:300]


# The README's calls (nbs/index.ipynb), without `;`
@pytest.mark.parametrize('code', [
    "learn.show_cams(fns[::18], ncols=8, figsize=(14, 2.2))",
    "learn.show_cam(fns[40], target='1', figsize=(3, 3.2))",
])
def test_readme_calls_show_once(kernel, code):
    quiet(kernel.run(code))


def test_interpretation_calls_show_once(kernel):
    "From the README and the tutorial: `from_learner` (one progress bar at most, updated in place), `plot_top_losses` once"
    out = kernel.run("interp = HeatmapInterpretation.from_learner(learn)")
    assert out['images'] == 0 and not out['texts'] and out['bars'] <= 1, out
    quiet(kernel.run("interp.plot_top_losses(6, nrows=1, figsize=(14, 3.4))"))
    quiet(kernel.run("interp.plot_top_losses(4, target='both', nrows=2, figsize=(12, 6.5))"))


def test_class_heatmaps_read_in_a_line(kernel):
    "`class_heatmaps()` as a cell's value: a line of text (and its picture), never `ClassHeatmaps(maps=tensor([[…`"
    out = kernel.run("ch = interp.class_heatmaps() if 'interp' in dir() else HeatmapInterpretation.from_learner(learn).class_heatmaps()\nch")
    assert out['bars'] <= 1, out
    text = ' '.join(out['texts'] + out['html'])
    assert 'ClassHeatmaps' in text and 'gradcam' in text and not TENSOR_DUMP.search(text), text[:500]
    assert out['images'] <= 1 and not out['streams'].strip(), out
    quiet(kernel.run("ch.show(figsize=(10, 3.8))"))


def test_explanation_reads_in_a_line(kernel):
    out = kernel.run("learn.explain(fns[:3])")
    assert out['images'] == 0 and len(out['texts']) == 1, out
    t = out['texts'][0]
    assert t.startswith('Explanation(') and 'gradcam' in t and len(t.splitlines()) <= 2 and not TENSOR_DUMP.search(t), t


@pytest.mark.parametrize('code', [
    # the tutorial's
    "learn.show_methods(seven, methods=['gradcam', 'gradcam++', 'scorecam', 'occlusion', 'integrated_gradients'], target='7', figsize=(14, 3.4))",
    "fig, axs = plt.subplots(1, 2, figsize=(6, 3.3))\nlearn.show_cam(seven, target='7', ax=axs[0]); axs[0].set_title('with the shortcut')\nlearn.show_cam(seven, target='7', ax=axs[1])",
    # the other drawing calls
    "learn.show_filters()",
    "learn.show_feature_maps(fns[0], max_n=16)",
    "show_conv(fns[0], 'top')",
    "interp.plot_confused_heatmaps() if 'interp' in dir() else HeatmapInterpretation.from_learner(learn).plot_confused_heatmaps()",
    "fig = learn.show_cams(fns[:3])", # assigned: the backend shows it at the end of the cell
    "fig = learn.show_cams(fns[:3])\nfig", # assigned, then the cell's value: still once
    "learn.max_activation(['0', '7'], steps=2, show=True)", # images returned, their figure shown once (issue 20)
])
def test_drawing_calls_show_once(kernel, code):
    quiet(kernel.run(code))


def test_max_activation_reads_in_a_line(kernel):
    "`max_activation` without `show`: its images as a cell's value read in a line, never `TensorImage([[[…`"
    out = kernel.run("learn.max_activation('7', steps=2)")
    assert out['images'] == 0 and len(out['texts']) == 1 and not out['streams'].strip(), out
    t = out['texts'][0]
    assert t.startswith('ActivationImages((3, 64, 64)') and len(t.splitlines()) == 1 and not TENSOR_DUMP.search(t), t


def test_loop_shows_each(kernel):
    "A loop of drawing calls shows one picture per call"
    quiet(kernel.run("for f in fns[:3]: learn.show_cam(f)"), images=3)


def test_shown_again_on_request(kernel):
    "A figure kept in a variable shows again when it is a later cell's value, once"
    kernel.run("fig = learn.show_cams(fns[:2])")
    quiet(kernel.run("fig"))


def test_explorer_driven_from_the_kernel(kernel):
    "`learn.explore(item)` displays its controls once; changing the class draws a new picture from the maps it has (no model call); every method draws or says why not"
    out = kernel.run("x = learn.explore(fns[3])\nx")
    assert out['widgets'] == 1 and out['images'] == 0 and not out['texts'] and not out['streams'].strip(), out
    out = kernel.run("v, n = x.image.value, x.computed\nx.cls.value = x.cls.options[1][1]\nprint(x.image.value != v, x.computed - n)")
    assert out['streams'].split() == ['True', '0'], out
    out = kernel.run("v = x.image.value\nx.alpha.value = 0.9\nprint(x.image.value != v, x.computed - n)")
    assert out['streams'].split() == ['True', '0'], out
    out = kernel.run("res = {}\nfor m in list(x.method.options[1:]) + [x.method.options[0]]: # each a change of method\n    v = x.image.value; x.method.value = m; res[m] = x.error or (x.image.value != v)\n"
                     "print(sorted(m for m, r in res.items() if r is not True))")
    assert not out['texts'] and out['error'] is None, out
    failed = eval(out['streams'].strip().splitlines()[-1])
    assert set(failed) <= {'cam'}, failed # CAM needs a GAP → Linear head, which fastai's default head is not: it says so instead of drawing


def test_explore_without_ipywidgets_says_what_to_install(kernel):
    out = kernel.run("import sys\nfrom unittest import mock\nwith mock.patch.dict(sys.modules, {'ipywidgets': None}):\n"
                     "    try: learn.explore(fns[3])\n    except ImportError as e: print(e)")
    assert "pip install 'fastai-heatmap[explore]'" in out['streams'], out
