"""Speed and agreement of every fastai_heatmap method against pytorch-grad-cam, torchcam and captum, side by side.

Run it from the repository root:

    python bench/benchmark.py                                  # every method, full settings (see below)
    python bench/benchmark.py --quick                          # every method, small batches and images, 3 repeats
    python bench/benchmark.py --quick --methods gradcam,scorecam --threads 1
    python bench/benchmark.py --threads 1 --write bench/RESULTS.md

What it measures, for a torchvision ``resnet18(weights=None, num_classes=10)`` in eval mode on the CPU (random weights,
random inputs; torch's thread count is left as it is unless ``--threads`` is given: on a busy machine ``--threads 1``
avoids the stalls of OpenMP threads that wait for each other):

* every method registered in fastai_heatmap (``method_names()``; ``--methods`` picks some), called as a user calls it:
  ``heatmap(model, x, method=name, layer='layer4', **options)`` (upsampled to the input's size and min-max normalized
  per image, the defaults), explaining each sample's predicted class (``targets=None``);
* the same method in the peer libraries that implement it, in their documented usage, on the same layer
  (pytorch-grad-cam's ``target_layers=[model.layer4[-1]]``, whose output is ``layer4``'s), the same images, the same
  number of images per forward pass, the same classes (the predictions, computed once and passed to the libraries that
  take targets), including the construction of their objects (hook registration) and the step that gives a map per
  image (torchcam's layer-resolution maps upsampled with ``F.interpolate``; captum's attributions reduced over the
  colour channels as our map is: ``abs().amax(1)``). captum needs the targets before its forward pass: its times
  include the ``no_grad`` forward a user runs to get the predicted classes. Progress bars are off for every library;
* two extra rows: SmoothGrad (``method='saliency', smooth=n``) against captum's ``NoiseTunnel(Saliency)`` with
  ``nt_samples=n``, and SS-CAM (``method='scorecam', smooth=n``) against torchcam's ``SSCAM(num_samples=n)``;
* a plain forward pass under ``torch.no_grad()`` at each setting: the baseline of every ``x fwd``.

Two settings: the cheap methods (one or two passes) run on ``--bs`` images of ``--size`` px; the expensive ones (a forward
pass per channel, window or step: scorecam, ablationcam, occlusion, integrated_gradients and the smoothed rows) on
``--heavy-bs`` images of ``--heavy-size`` px, the same for ours and the peers. The table says which.

Each time is the median over the repeats after one warm-up run of each; within a setting every implementation runs once
per round, round-robin with a rotating start, in one process, so that they all see the same machine conditions.

After the timings: how far apart the normalized maps of each pair that follows the same formula are (the outputs of the
timed runs, so it costs nothing more; known deviations are named), how many (sample, channel) pairs ours skipped in
Score-CAM / Ablation-CAM because their activation is all zero, and, when gradcam is among the methods, the memory autograd
keeps for Grad-CAM and the state each library leaves the model in. Each of our methods that misses its target is then
profiled (cProfile and forward hooks on the model's top-level modules, one call; ``--no-profile`` skips it). ``--write``
writes all of it, with the machine, the versions, the load and the date, as markdown.
"""
from __future__ import annotations
import argparse, datetime, gc, os, platform, shlex, statistics, sys, time, warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault('TQDM_DISABLE', '1')  # pytorch-grad-cam's per-image tqdm bars (ours: bar=False)

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)
warnings.filterwarnings('ignore', category=UserWarning)

try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastai_heatmap
from fastai_heatmap.core import heatmap, get_method, method_names
from torchvision.models import resnet18

try:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam import GradCAM as PGGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError: pgc = PGGradCAM = None
try:
    import torchcam.methods as tcm
    from torchcam.methods import GradCAM as TCGradCAM, CAM as TCCAM
except ImportError: tcm = TCGradCAM = TCCAM = None
try:
    import captum.attr as cpt
    from captum.attr import LayerGradCam, LayerAttribution
except ImportError: cpt = LayerGradCam = None

PGC, TC, CPT = 'pytorch-grad-cam', 'torchcam', 'captum'
PEERS = (PGC, TC, CPT)
EXTRA_ROWS = ('smoothgrad', 'sscam')  # not methods of their own: saliency and scorecam with smooth=n

FULL = dict(bs=16, size=224, repeats=9, heavy_bs=2, heavy_size=96, heavy_repeats=5, steps=50, smooth=20, sscam=2)
QUICK = dict(bs=4, size=128, repeats=3, heavy_bs=1, heavy_size=64, heavy_repeats=3, steps=16, smooth=8, sscam=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='Defaults: ' + ', '.join(f'{k}={v}' for k, v in FULL.items()) + '; with --quick: ' + ', '.join(f'{k}={v}' for k, v in QUICK.items()))
    p.add_argument('--methods', default=None, help=f"comma-separated methods to run (default: all). Names of fastai_heatmap.core.method_names() (aliases work), plus {', '.join(EXTRA_ROWS)}")
    p.add_argument('--quick', action='store_true', help='small batches and images, 3 repeats (explicit options still win)')
    p.add_argument('--bs', type=int, default=None, help='batch size of the cheap methods')
    p.add_argument('--size', type=int, default=None, help='image height and width of the cheap methods')
    p.add_argument('--repeats', type=int, default=None, help='timed runs of each cheap method; the median is reported')
    p.add_argument('--heavy-bs', type=int, default=None, help='batch size of the expensive methods (scorecam, ablationcam, occlusion, integrated_gradients, smoothgrad, sscam)')
    p.add_argument('--heavy-size', type=int, default=None, help='image height and width of the expensive methods')
    p.add_argument('--heavy-repeats', type=int, default=None, help='timed runs of each expensive method')
    p.add_argument('--batch-size', type=int, default=64, help="images per forward pass of the methods that run the model on modified inputs (ours: batch_size=; the peers' equivalent)")
    p.add_argument('--steps', type=int, default=None, help='integrated gradients: steps (captum: n_steps, method=riemann_middle)')
    p.add_argument('--smooth', type=int, default=None, help='smoothgrad: noisy samples (captum NoiseTunnel: nt_samples)')
    p.add_argument('--sscam', type=int, default=None, help='sscam: noisy masks per channel (torchcam SSCAM: num_samples)')
    p.add_argument('--window', type=int, default=None, help='occlusion window (default: heavy size // 8)')
    p.add_argument('--stride', type=int, default=None, help='occlusion stride (default: window // 2)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads; default: leave as is')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-checks', action='store_true', help='skip the memory and model-state checks')
    p.add_argument('--no-profile', action='store_true', help='do not profile (cProfile, one call) the methods of ours that miss their target')
    p.add_argument('--write', default=None, metavar='PATH', help='write the results as markdown (e.g. bench/RESULTS.md)')
    a = p.parse_args(argv)
    prof = QUICK if a.quick else FULL
    for k, v in prof.items():
        if getattr(a, k) is None: setattr(a, k, v)
    a.window = a.window or max(1, a.heavy_size // 8)
    a.stride = a.stride or max(1, a.window // 2)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    return a


def select_methods(spec):
    "Canonical names to run, in registry order (then the extra rows)"
    allowed = method_names() + list(EXTRA_ROWS)
    if not spec: return allowed
    want = []
    for s in (o.strip() for o in spec.split(',')):
        if not s: continue
        if s.lower() in EXTRA_ROWS: want.append(s.lower()); continue
        try: want.append(get_method(s).name)
        except ValueError as e: raise SystemExit(f"--methods: {e} Extra rows: {', '.join(EXTRA_ROWS)}.")
    return [n for n in allowed if n in want]


def make_model(seed=0):
    torch.manual_seed(seed)
    return resnet18(weights=None, num_classes=10)


# ---------------------------------------------------------------------------------------------- building blocks
# Every timed function takes (model, x, preds) and returns its maps (so nothing is optimised away and the agreement
# check can reuse them).

@dataclass
class Impl:
    key: str  # unique label in the detailed table
    lib: str  # 'ours', one of PEERS, or 'torch'
    fn: Callable
    cleanup: Callable = lambda m: None
    note: str = ''  # what is special about this call (shown in the detailed table)
    summary: bool = True  # whether its time goes into the summary table


@dataclass
class Case:
    method: str  # the row's name
    tier: str  # 'cheap' or 'heavy'
    ours: Impl
    peers: list = field(default_factory=list)
    target: tuple | None = None  # ('fwd', x) ours <= x * forward; ('peers', 1.0) ours <= every peer
    settings: str = ''
    agree: dict = field(default_factory=dict)  # peer key -> None (same formula) or the known deviation
    extra: list = field(default_factory=list)  # more rows for the detailed table


def clear_grads(model): model.zero_grad(set_to_none=True)

def plain_forward(model, x, preds):
    with torch.no_grad(): return model(x)

def forward_backward(model, x, preds):
    out = model(x)
    out[torch.arange(len(x)), preds].sum().backward()
    return out.detach()

def predict(model, x):
    "The forward a captum user runs first, to get the classes to explain"
    with torch.no_grad(): return model(x).argmax(1)

def up(maps, x):
    "Layer-resolution maps (B, h, w) upsampled to the input's size, as a user does to overlay them"
    return F.interpolate(maps[:, None], size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]

def channel_map(attr):
    "captum's per-channel attributions (B, C, H, W) as one map per image: the largest magnitude over the channels (what ours shows)"
    return attr.detach().abs().amax(1)

def ours(name, layer=True, **kw):
    def fn(model, x, preds): return heatmap(model, x, method=name, layer='layer4' if layer else None, bar=False, **kw)
    return fn

def pgc_fn(cls_name, batch_size=None):
    cls = getattr(pgc, cls_name)
    def fn(model, x, preds):
        # Documented usage: the `with` block releases the hooks; the call min-max normalizes and cv2-resizes to the input size
        with cls(model=model, target_layers=[model.layer4[-1]]) as cam:
            if batch_size is not None: cam.batch_size = batch_size  # ScoreCAM reads this attribute (16 when absent)
            return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds]))
    return fn

def pgc_ablation_fn(batch_size):
    def fn(model, x, preds):
        with pgc.AblationCAM(model=model, target_layers=[model.layer4[-1]], batch_size=batch_size) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds]))
    return fn

def tc_grad_fn(cls_name):
    cls = getattr(tcm, cls_name)
    def fn(model, x, preds):
        # Documented usage: extractor as a context manager, forward with grad inside it, then call it with the scores;
        # the maps come at layer resolution (normalized): upsample them to overlay them on the images
        with cls(model, 'layer4') as extractor:
            scores = model(x)
            cams = extractor(scores.argmax(1).tolist(), scores)[0]
        return up(cams, x)
    return fn

def tc_cam(model, x, preds):
    with TCCAM(model, 'layer4', 'fc') as extractor:
        with torch.no_grad(): scores = model(x)
        cams = extractor(scores.argmax(1).tolist())[0]
    return up(cams, x)

def tc_score_fn(batch_size, num_samples=None, std=None):
    def fn(model, x, preds):
        if num_samples: extractor = tcm.SSCAM(model, 'layer4', batch_size=batch_size, num_samples=num_samples, std=std)
        else: extractor = tcm.ScoreCAM(model, 'layer4', batch_size=batch_size)
        with extractor:
            with torch.no_grad(): scores = model(x)
            cams = extractor(scores.argmax(1).tolist())[0]
        return up(cams, x)
    return fn

def captum_layer_gradcam(model, x, preds):
    attr = LayerGradCam(model, model.layer4).attribute(x, target=preds, relu_attributions=True)  # the paper's ReLU (default: signed)
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), 'bilinear')[:, 0].detach()

def captum_gradcam_with_preds(model, x, preds): return captum_layer_gradcam(model, x, predict(model, x))

def captum_grad_fn(cls_name, **kw):
    cls = getattr(cpt, cls_name)
    def fn(model, x, preds): return channel_map(cls(model).attribute(x, target=predict(model, x), **kw))
    return fn

def captum_guided_gradcam(model, x, preds):
    attr = cpt.GuidedGradCam(model, model.layer4).attribute(x, target=predict(model, x), interpolate_mode='bilinear')
    return channel_map(attr)

def captum_ig_fn(steps, batch_size):
    def fn(model, x, preds):
        attr = cpt.IntegratedGradients(model).attribute(x, target=predict(model, x), n_steps=steps, method='riemann_middle',
                                                         internal_batch_size=batch_size)
        return channel_map(attr)
    return fn

def captum_occlusion_fn(window, stride, per_eval):
    def fn(model, x, preds):
        p = predict(model, x)
        probs = lambda inp: model(inp).softmax(-1)  # ours measures the drop of the class probability
        attr = cpt.Occlusion(probs).attribute(x, sliding_window_shapes=(x.shape[1], window, window), strides=(x.shape[1], stride, stride),
                                              target=p, perturbations_per_eval=per_eval)
        return attr[:, 0].detach()  # the same map repeated over the channels the window covers
    return fn

def captum_smoothgrad_fn(n, per_batch, stdevs):
    def fn(model, x, preds):
        attr = cpt.NoiseTunnel(cpt.Saliency(model)).attribute(x, nt_type='smoothgrad', nt_samples=n, nt_samples_batch_size=per_batch,
                                                               stdevs=stdevs, target=predict(model, x))
        return channel_map(attr)
    return fn


# ---------------------------------------------------------------------------------------------- the cases
def make_cases(names, a):
    "One Case per method to time; its settings as text"
    cheap = f"bs {a.bs}, {a.size}px"
    heavy = f"bs {a.heavy_bs}, {a.heavy_size}px"
    bsz = a.batch_size
    k = max(1, bsz // a.heavy_bs)  # captum's "per input" batching: k perturbations/noisy samples x heavy_bs images per forward
    cases = []
    for name in names:
        c = None
        if name == 'gradcam':
            c = Case(name, 'cheap', Impl('ours gradcam', 'ours', ours('gradcam')), settings=cheap + ', layer4', target=('fwd', 1.15))
            c.extra = [Impl('forward + full backward', 'torch', forward_backward, clear_grads, 'context: what a whole backward costs'),
                       Impl('ours gradcam (layer res, raw)', 'ours', ours('gradcam', upsample=False, norm=None), note='upsample=False, norm=None')]
            if pgc: c.peers.append(Impl('pytorch-grad-cam GradCAM', PGC, pgc_fn('GradCAM'), clear_grads))
            if tcm: c.peers.append(Impl('torchcam GradCAM', TC, tc_grad_fn('GradCAM'), clear_grads))
            if cpt:
                c.peers.append(Impl('captum LayerGradCam', CPT, captum_gradcam_with_preds, clear_grads, '+ no_grad forward for the targets'))
                c.extra.append(Impl('captum LayerGradCam, targets given', CPT, captum_layer_gradcam, clear_grads, 'without that forward'))
            c.agree = {'pytorch-grad-cam GradCAM': None, 'torchcam GradCAM': None, 'captum LayerGradCam': None}
        elif name == 'cam':
            c = Case(name, 'cheap', Impl('ours cam', 'ours', ours('cam')), settings=cheap + ', layer4')
            if tcm: c.peers.append(Impl('torchcam CAM', TC, tc_cam))
            c.agree = {'torchcam CAM': "torchcam's CAM applies no ReLU before normalizing"}
        elif name in ('gradcam++', 'xgradcam', 'layercam', 'hirescam', 'eigencam', 'eigengradcam'):
            pg = dict(zip(('gradcam++', 'xgradcam', 'layercam', 'hirescam', 'eigencam', 'eigengradcam'),
                          ('GradCAMPlusPlus', 'XGradCAM', 'LayerCAM', 'HiResCAM', 'EigenCAM', 'EigenGradCAM')))[name]
            tc = {'gradcam++': 'GradCAMpp', 'xgradcam': 'XGradCAM', 'layercam': 'LayerCAM'}.get(name)
            target = ('fwd', 1.15) if name in ('gradcam++', 'xgradcam', 'layercam', 'hirescam') else None
            c = Case(name, 'cheap', Impl(f'ours {name}', 'ours', ours(name)), settings=cheap + ', layer4', target=target)
            if pgc:
                c.peers.append(Impl(f'pytorch-grad-cam {pg}', PGC, pgc_fn(pg), clear_grads))
                c.agree[f'pytorch-grad-cam {pg}'] = {
                    'gradcam++': "pytorch-grad-cam adds eps=1e-6 to alpha's denominator (matters when gradients are small, as with random weights)",
                    'eigencam': 'sign', 'eigengradcam': 'sign'}.get(name)
            if tcm and tc:
                c.peers.append(Impl(f'torchcam {tc}', TC, tc_grad_fn(tc), clear_grads))
                c.agree[f'torchcam {tc}'] = "torchcam's Grad-CAM++ sums A*g^3 per position, not over the map (not the paper's eq. 19)" if name == 'gradcam++' else None
        elif name == 'scorecam':
            c = Case(name, 'heavy', Impl('ours scorecam', 'ours', ours('scorecam', batch_size=bsz), note=f'batch_size={bsz}'),
                     settings=f"{heavy}, layer4, {bsz} masked images per forward", target=('peers', 1.0))
            if pgc:
                c.peers.append(Impl('pytorch-grad-cam ScoreCAM', PGC, pgc_fn('ScoreCAM', bsz), clear_grads, f'cam.batch_size={bsz} (per image)'))
                c.agree['pytorch-grad-cam ScoreCAM'] = 'pytorch-grad-cam: softmax across channels of the raw scores, corner-aligned mask upsampling'
            if tcm:
                c.peers.append(Impl('torchcam ScoreCAM', TC, tc_score_fn(bsz), note=f'batch_size={bsz}'))
                c.agree['torchcam ScoreCAM'] = 'torchcam: softmax across channels of score differences to the unmasked input'
        elif name == 'ablationcam':
            c = Case(name, 'heavy', Impl('ours ablationcam', 'ours', ours('ablationcam', batch_size=bsz), note=f'batch_size={bsz}'),
                     settings=f"{heavy}, layer4, {bsz} ablated copies per forward", target=('peers', 1.0))
            if pgc:
                c.peers.append(Impl('pytorch-grad-cam AblationCAM', PGC, pgc_ablation_fn(bsz), clear_grads, f'batch_size={bsz} (per image)'))
                c.agree['pytorch-grad-cam AblationCAM'] = None
        elif name in ('saliency', 'input_x_gradient', 'guided', 'rectified'):
            cls = dict(saliency='Saliency', input_x_gradient='InputXGradient', guided='GuidedBackprop', rectified='Deconvolution')[name]
            c = Case(name, 'cheap', Impl(f'ours {name}', 'ours', ours(name, layer=False)), settings=cheap,
                     target=('fwd', 2.5) if name in ('saliency', 'guided') else None)
            if cpt:
                c.peers.append(Impl(f'captum {cls}', CPT, captum_grad_fn(cls), clear_grads, '+ forward for targets, abs().amax(1)'))
                c.agree[f'captum {cls}'] = None
        elif name == 'guided_gradcam':
            c = Case(name, 'cheap', Impl('ours guided_gradcam', 'ours', ours(name)), settings=cheap + ', layer4')
            if cpt:
                c.peers.append(Impl('captum GuidedGradCam', CPT, captum_guided_gradcam, clear_grads, "interpolate_mode='bilinear', + forward for targets"))
                c.agree['captum GuidedGradCam'] = None
        elif name == 'integrated_gradients':
            c = Case(name, 'heavy', Impl('ours integrated_gradients', 'ours', ours(name, layer=False, steps=a.steps, batch_size=bsz)),
                     settings=f"{heavy}, {a.steps} steps, {bsz} images per pass", target=('peers', 1.0))
            if cpt:
                c.peers.append(Impl('captum IntegratedGradients', CPT, captum_ig_fn(a.steps, bsz), clear_grads,
                                    f"riemann_middle, internal_batch_size={bsz}, + forward for targets"))
                c.agree['captum IntegratedGradients'] = None
        elif name == 'occlusion':
            c = Case(name, 'heavy', Impl('ours occlusion', 'ours', ours(name, layer=False, window=a.window, stride=a.stride, batch_size=k * a.heavy_bs),
                                         note=f'batch_size={k * a.heavy_bs}'),
                     settings=f"{heavy}, window {a.window}, stride {a.stride}, {k * a.heavy_bs} images per forward", target=('peers', 1.0))
            if cpt:
                c.peers.append(Impl('captum Occlusion', CPT, captum_occlusion_fn(a.window, a.stride, k), note=f'softmax forward, perturbations_per_eval={k}, + forward for targets'))
                c.agree['captum Occlusion'] = None if (a.heavy_size - a.window) % a.stride == 0 else \
                    "the windows do not tile the image: ours adds one flush with the border, captum does not (pick --window/--stride that tile)"
        elif name == 'smoothgrad':
            c = Case('saliency smooth=%d (SmoothGrad)' % a.smooth, 'heavy',
                     Impl('ours saliency smooth', 'ours', ours('saliency', layer=False, smooth=a.smooth, batch_size=k * a.heavy_bs), note=f'batch_size={k * a.heavy_bs}'),
                     settings=f"{heavy}, n={a.smooth}, {min(k, a.smooth) * a.heavy_bs} noisy images per pass")
            if cpt:
                c.peers.append(Impl('captum NoiseTunnel(Saliency)', CPT, captum_smoothgrad_fn(a.smooth, k, 1.0), clear_grads,
                                    f'nt_samples={a.smooth}, nt_samples_batch_size={k}, + forward for targets'))
                c.agree['captum NoiseTunnel(Saliency)'] = 'random noise: not comparable'
        elif name == 'sscam':
            c = Case('scorecam smooth=%d (SS-CAM)' % a.sscam, 'heavy',
                     Impl('ours scorecam smooth', 'ours', ours('scorecam', smooth=a.sscam, batch_size=bsz), note=f'batch_size={bsz}'),
                     settings=f"{heavy}, layer4, n={a.sscam}, noise 0.15, {bsz} masked images per forward")
            if tcm:
                c.peers.append(Impl('torchcam SSCAM', TC, tc_score_fn(bsz, a.sscam, 0.15), note=f'batch_size={bsz}, num_samples={a.sscam}, std=0.15'))
                c.agree['torchcam SSCAM'] = 'random noise, and torchcam\'s channel softmax: not comparable'
        else:  # a method registered after this script was written: ours alone
            meth = get_method(name)
            tier = 'heavy' if 'per' in (meth.cost or '') else 'cheap'
            c = Case(name, tier, Impl(f'ours {name}', 'ours', ours(name, layer=meth.uses_layer)),
                     settings=(heavy if tier == 'heavy' else cheap) + (', layer4' if meth.uses_layer else '') + '; no peer known to this script')
        cases.append(c)
    return cases


# ---------------------------------------------------------------------------------------------- timing
def time_all(model, x, preds, impls, repeats):
    "Median wall time (s) of each implementation and its last output; one warm-up each, then `repeats` interleaved rounds"
    times, last = {i.key: [] for i in impls}, {}
    for i in impls:  # warm-up
        i.fn(model, x, preds); i.cleanup(model)
    n = len(impls)
    for r in range(repeats):
        for j in range(n):
            i = impls[(j + r) % n]
            gc.collect()
            t0 = time.perf_counter()
            out = i.fn(model, x, preds)
            times[i.key].append(time.perf_counter() - t0)
            last[i.key] = out.detach() if isinstance(out, torch.Tensor) else out
            del out
            i.cleanup(model)
    return {k: statistics.median(v) for k, v in times.items()}, last, times


# ---------------------------------------------------------------------------------------------- agreement
def minmax(m):
    lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)

def as_map(m): return minmax(torch.as_tensor(m).float().relu())

def eigen_agreement(model, x, preds, name, theirs):
    "Our raw map with the sign chosen per image that best matches theirs (pytorch-grad-cam leaves the eigenvector's sign arbitrary)"
    raw = heatmap(model, x, targets=preds, method=name, layer='layer4', upsample=False, norm=None, relu=False)
    cands = torch.stack([minmax(up((s * raw).relu(), x)) for s in (1., -1.)])  # (2, B, H, W): ReLU at layer resolution, then upsampled, as both do
    d = (cands - as_map(theirs)[None]).abs().flatten(2).amax(2)  # (2, B)
    return d.amin(0).max().item(), int((d[1] < d[0]).sum())

def agreements(model, cases, tiers, last):
    "(method, peer, max abs diff of normalized maps, note) for each pair the script knows how to compare"
    rows = []
    for c in cases:
        x, preds = tiers[c.tier]['x'], tiers[c.tier]['preds']
        mine = last.get(c.ours.key)
        for p in c.peers:
            if p.key not in c.agree or mine is None: continue
            note = c.agree[p.key]
            if note and 'not comparable' in note: rows.append((c.method, p.key, None, note)); continue
            if note == 'sign':
                d, flips = eigen_agreement(model, x, preds, c.method, last[p.key])
                rows.append((c.method, p.key, d, f'their sign is arbitrary: ours matches after flipping {flips}/{len(x)} maps'))
                continue
            rows.append((c.method, p.key, (as_map(mine) - as_map(last[p.key])).abs().max().item(), note))
    return rows

def raw_gradcam_agreement(model, x, preds):
    "Raw (unnormalized) checks of Grad-CAM and CAM at layer resolution, on 4 images: (what, max abs diff, scale)"
    x, preds = x[:4], preds[:4]
    rows = []
    raw = heatmap(model, x, targets=preds, method='gradcam', layer='layer4', upsample=False, norm=None)
    scale = raw.abs().max().item()
    if LayerGradCam is not None:
        cap = LayerGradCam(model, model.layer4).attribute(x, target=preds, relu_attributions=True)[:, 0].detach()
        rows.append(('captum LayerGradCam, raw, layer res (relu_attributions=True)', (raw - cap).abs().max().item(), scale))
    if TCGradCAM is not None:
        with TCGradCAM(model, 'layer4') as ex:
            scores = model(x)
            tc = ex(preds.tolist(), scores, normalized=False)[0]
        rows.append(('torchcam GradCAM, raw, layer res (normalized=False)', (raw - tc).abs().max().item(), scale))
    if TCCAM is not None:
        # torchcam's CAM applies no ReLU (whatever its docstring's formula says): compare our signed map (relu=False)
        cam_raw = heatmap(model, x, targets=preds, method='cam', layer='layer4', upsample=False, norm=None, relu=False).detach()
        with TCCAM(model, 'layer4', 'fc') as ex:
            with torch.no_grad(): model(x)
            tcc = ex(preds.tolist(), normalized=False)[0]
        rows.append(('torchcam CAM, raw, layer res (vs our relu=False)', (cam_raw - tcc).abs().max().item(), cam_raw.abs().max().item()))
        hw = raw.shape[-2] * raw.shape[-1]  # GAP -> Linear head: Grad-CAM's weights are the fc weights / (h*w)
        rows.append((f'our CAM vs our Grad-CAM x h*w ({hw}), raw', (cam_raw.relu() - raw * hw).abs().max().item(), cam_raw.abs().max().item()))
    clear_grads(model)
    return rows

def dead_channels(model, x):
    "(sample, channel) pairs of layer4 whose activation is all zero (ours skips them in Score-CAM and Ablation-CAM), and the total"
    got = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: got.setdefault('a', o.detach()))
    try:
        with torch.no_grad(): model(x)
    finally: h.remove()
    a = got['a']
    return int((~a.flatten(2).ne(0).any(2)).sum()), a.shape[0] * a.shape[1], tuple(a.shape[-2:])


# ---------------------------------------------------------------------------------------------- memory and state (Grad-CAM)
def saved_for_backward(fn, model, x, preds):
    "Bytes of the distinct storages (parameters excluded) autograd saves for backward while `fn` runs: activations a forward with grad keeps alive"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}
    def pack(t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params: seen[st.data_ptr()] = st.nbytes()
        except Exception: pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): fn(model, x, preds)
    return sum(seen.values())

def graph_start(model, x, preds):
    "Where our Grad-CAM's graph starts, and the memory autograd keeps, with and without other forward hooks reading layer4 (issue 21)"
    from fastai.callback.hook import hook_output
    from fastai_heatmap.hooks import ActivationHook
    rows = []
    for what, other in [('nothing else reads layer4', None), ("a fastai hook_output(layer4, detach=False) on the layer (as DynamicUnet's skip connections)", model.layer4),
                        ('a hook on layer4[-1], inside the layer (its output is the layer\'s)', model.layer4[-1])]:
        h = hook_output(other, detach=False) if other is not None else None
        try:
            with ActivationHook(model.layer4, grad=True) as a:
                with torch.no_grad(): model(x)
            mem = saved_for_backward(ours('gradcam'), model, x, preds)
        finally:
            if h is not None: h.remove()
        rows.append(f"{what}: graph starts at layer4's {'input (recording layer4 too)' if a.from_input else 'output (head only)'}, {mem / 2**20:.2f} MiB kept for the backward pass")
    return rows

def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, '_backward_pre_hooks', {})) for m in model.modules())

def snapshot(model):
    return dict(hooks=n_hooks(model),
                training=[m.training for m in model.modules()],
                grads=sum(p.grad is not None for p in model.parameters()),
                bn=[b.clone() for b in model.buffers()])

def describe_change(before, after, n_params):
    notes = []
    if after['hooks'] != before['hooks']: notes.append(f"{after['hooks'] - before['hooks']} hook(s) left on the model")
    if after['training'] != before['training']:
        n = sum(a != b for a, b in zip(before['training'], after['training']))
        notes.append(f"training flag changed on {n} modules (now {'eval' if not any(after['training']) else 'mixed/train'})")
    if after['grads'] != before['grads']: notes.append(f".grad populated on {after['grads']}/{n_params} parameters")
    if any(not torch.equal(a, b) for a, b in zip(before['bn'], after['bn'])): notes.append('BatchNorm running stats updated (ran in train mode)')
    return '; '.join(notes) or 'unchanged'

def state_checks(x, seed):
    "What each library's documented usage leaves behind, on a fresh model in train mode with no .grad"
    x = x[:4]
    with torch.no_grad(): preds = make_model(seed).eval()(x).argmax(1)
    checks = [('fastai_heatmap heatmap (gradcam)', lambda m: ours('gradcam')(m, x, preds)),
              ('fastai_heatmap heatmap (cam)', lambda m: ours('cam')(m, x, preds))]
    if PGGradCAM is not None:
        checks.append(('pytorch-grad-cam, `with` block', lambda m: pgc_fn('GradCAM')(m, x, preds)))
        def pg_no_with(m):  # an object kept around (e.g. reused over batches), as in many tutorials
            cam = PGGradCAM(model=m, target_layers=[m.layer4[-1]])
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds])
            pg_no_with.keep = cam
            return out
        checks.append(('pytorch-grad-cam, object kept alive', pg_no_with))
    if TCGradCAM is not None: checks.append(('torchcam GradCAM, `with` block', lambda m: tc_grad_fn('GradCAM')(m, x, preds)))
    if LayerGradCam is not None: checks.append(('captum LayerGradCam', lambda m: captum_layer_gradcam(m, x, preds)))
    rows = []
    for name, fn in checks:
        m = make_model(seed).train()
        before = snapshot(m)
        fn(m)
        rows.append((name, describe_change(before, snapshot(m), len(list(m.parameters())))))
    if PGGradCAM is not None:
        del pg_no_with.keep
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------- profile
def profile_call(fn, model, x, preds, top=8):
    """One call under cProfile: (total seconds, [(function, calls, own seconds)] of the `top` functions by own time,
    (calls of the model, seconds in its forward passes, {child module: seconds})), the last from forward hooks"""
    import cProfile, pstats
    acc, calls, stack = {}, [0], []
    def pre(name):
        def f(m, i): stack.append(time.perf_counter())
        return f
    def post(name):
        def f(m, i, o):
            acc[name] = acc.get(name, 0.) + time.perf_counter() - stack.pop()
            if name == '': calls[0] += 1
        return f
    mods = [('', model)] + list(model.named_children())
    handles = [h for n, m in mods for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    pr = cProfile.Profile()
    try:
        pr.enable()
        try: fn(model, x, preds)
        finally: pr.disable()
    finally:
        for h in handles: h.remove()
    clear_grads(model)
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    fmt = lambda f: f[2] if f[0] == '~' else f"{Path(f[0]).name}:{f[1]}({f[2]})"
    return st.total_tt, [(fmt(f), v[1], v[2]) for f, v in rows], (calls[0], acc.pop('', 0.), acc)


# ---------------------------------------------------------------------------------------------- report
def cpu_model():
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def versions():
    from importlib.metadata import version
    out = []
    for label in ('torch', 'torchvision', 'fastai', 'fastai_heatmap', 'captum', 'grad-cam', 'torchcam'):
        try: v = fastai_heatmap.__version__ if label == 'fastai_heatmap' else version(label)
        except Exception: v = 'missing'
        out.append(f'{label} {v}')
    return out

def verdict(c, t_ours, base, peer_times):
    if c.target is None: return ''
    kind, lim = c.target
    if kind == 'fwd':
        r = t_ours / base
        return f"{'met' if r <= lim else 'MISSED'} (<= {lim}x fwd)"
    if not peer_times: return 'no peer'
    worst = max(t_ours / t for t in peer_times.values())
    return f"{'met' if worst <= lim else 'MISSED'} (<= every peer)"

def build_report(a, cases, tiers, med, agree, dead, extras, loads, started):
    L = []
    L.append('# fastai_heatmap benchmark: every method against its peers\n')
    L.append(f"Generated by `python bench/benchmark.py {' '.join(shlex.quote(s) for s in a.argv)}` on {started:%Y-%m-%d %H:%M} (local time).\n")
    L.append(f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs; {torch.get_num_threads()} torch threads; "
             f"load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end (other processes share the CPUs: times are noisy)")
    L.append(f"- Versions: {', '.join(versions())}; Python {platform.python_version()}")
    L.append(f"- Model: torchvision resnet18(weights=None, num_classes=10), eval mode, CPU, random inputs; every map explains the predicted class")
    L.append(f"- Cheap methods: batch {a.bs}x3x{a.size}x{a.size}, median of {a.repeats} (after 1 warm-up); "
             f"expensive ones: batch {a.heavy_bs}x3x{a.heavy_size}x{a.heavy_size}, median of {a.heavy_repeats}; interleaved round-robin within each setting")
    L.append(f"- `ms` is ours; `x fwd` is ours / a no_grad forward at the same setting "
             f"(cheap: {med['cheap']['forward, no_grad'] * 1e3:.1f} ms" + (f", expensive: {med['heavy']['forward, no_grad'] * 1e3:.1f} ms" if 'heavy' in med else '') + "); "
             "each peer column is ours / theirs (below 1: ours is faster) with their time in brackets.\n")
    L.append('| method | ms | x fwd | vs ' + ' | vs '.join(PEERS) + ' | settings | target |')
    L.append('|---|---:|---:|' + '---|' * len(PEERS) + '---|---|')
    for c in cases:
        m, base = med[c.tier], med[c.tier]['forward, no_grad']
        t = m[c.ours.key]
        peer_t = {p.key: m[p.key] for p in c.peers if p.summary}
        cells = []
        for lib in PEERS:
            ps = [p for p in c.peers if p.lib == lib and p.summary]
            cells.append('<br>'.join(f"{t / m[p.key]:.2f}x ({m[p.key] * 1e3:.0f} ms {p.key.split(' ', 1)[1]})" for p in ps) or '-')
        L.append(f"| {c.method} | {t * 1e3:.1f} | {t / base:.2f} | " + ' | '.join(cells) + f" | {c.settings} | {verdict(c, t, base, peer_t)} |")
    L.append('\nEvery implementation (ms, x the forward at its setting):\n')
    L.append('| setting | implementation | ms | x fwd | min-max ms | note |')
    L.append('|---|---|---:|---:|---:|---|')
    for tier, tk in (('cheap', f'bs {a.bs}, {a.size}px'), ('heavy', f'bs {a.heavy_bs}, {a.heavy_size}px')):
        if tier not in med: continue
        base = med[tier]['forward, no_grad']
        seen = set()
        for i in tiers[tier]['impls']:
            if i.key in seen: continue
            seen.add(i.key)
            v = tiers[tier]['samples'][i.key]
            L.append(f"| {tk} | {i.key} | {med[tier][i.key] * 1e3:.1f} | {med[tier][i.key] / base:.2f} | {min(v) * 1e3:.0f}-{max(v) * 1e3:.0f} | {i.note} |")
    if dead:
        n_dead, tot, hw = dead
        L.append(f"\nScore-CAM / Ablation-CAM: layer4 maps are {hw[0]}x{hw[1]}; ours skipped {n_dead} of {tot} (sample, channel) pairs whose activation is all zero "
                 f"(it ran {tot - n_dead} masked/ablated forwards per method, pytorch-grad-cam and torchcam ran {tot}).")
    L.append('\nAgreement: max abs difference of the normalized maps (ReLU then min-max per image, at input size) from the timed runs:\n')
    L.append('| method | peer | max abs diff | note |')
    L.append('|---|---|---:|---|')
    for meth, peer, d, note in agree:
        L.append(f"| {meth} | {peer} | {'-' if d is None else f'{d:.1e}'} | {('known deviation: ' + note) if note and d is not None and 'sign' not in note else (note or 'same formula')} |")
    for title, rows in extras:
        L.append(f'\n{title}\n')
        L.extend(f'- {r}' for r in rows)
    L.append('\nNotes: captum times include the no_grad forward that gives it the targets, and its attributions reduced to a map (abs().amax(1); '
             "LayerGradCam with relu_attributions=True, the paper's ReLU). ours: the library's defaults (upsampled to the input size, min-max per image), bar=False. "
             'pytorch-grad-cam returns numpy maps, min-max normalized and cv2-resized to the input size, and calls loss.backward() through the whole '
             'network (filling every parameter\'s .grad). torchcam returns layer-resolution maps, normalized; the F.interpolate to the input size is '
             'included. captum\'s perturbations_per_eval and nt_samples_batch_size count perturbations per input image, so they are set to '
             '(images per forward) / batch size, so that every library runs the model on the same number of images per forward pass.')
    return '\n'.join(L) + '\n'


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    a = parse_args(argv)
    started = datetime.datetime.now()
    if a.threads: torch.set_num_threads(a.threads)
    names = select_methods(a.methods)
    load0, ncpu = os.getloadavg()[0], os.cpu_count() or 1
    print(f"resnet18(weights=None, num_classes=10), eval, CPU ({cpu_model()}, {ncpu} CPUs), {torch.get_num_threads()} torch threads")
    print('; '.join(versions()))
    print(f"load average {load0:.1f} on {ncpu} CPUs" + (
        " -- WARNING: other processes are using the CPUs; timings are noisy and torch's OpenMP threads may stall "
        "(try --threads 1, or rerun on an idle machine)" if load0 > ncpu - 0.5 else ''))
    print(f"methods: {', '.join(names)}")

    model = make_model(a.seed).eval()
    cases = make_cases(names, a)
    tiers = {}
    for tier, bs, size, reps in (('cheap', a.bs, a.size, a.repeats), ('heavy', a.heavy_bs, a.heavy_size, a.heavy_repeats)):
        cs = [c for c in cases if c.tier == tier]
        if not cs and tier == 'heavy': continue
        x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(a.seed + (tier == 'heavy')))
        with torch.no_grad(): preds = model(x).argmax(1)
        impls = [Impl('forward, no_grad', 'torch', plain_forward, note='the baseline of x fwd')]
        for c in cs: impls += [c.ours] + c.extra + c.peers
        tiers[tier] = dict(x=x, preds=preds, impls=impls, repeats=reps)

    med, last = {}, {}
    for tier, t in tiers.items():
        print(f"\ntiming {len(t['impls'])} implementations on {tuple(t['x'].shape)}, {t['repeats']} rounds (+1 warm-up); classes {t['preds'].tolist()} ...", flush=True)
        t0 = time.perf_counter()
        med[tier], lt, t['samples'] = time_all(model, t['x'], t['preds'], t['impls'], t['repeats'])
        last.update(lt)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

    agree = agreements(model, cases, tiers, last)
    clear_grads(model)
    dead = dead_channels(model, tiers['heavy']['x']) if any(c.method in ('scorecam', 'ablationcam') or 'SS-CAM' in c.method for c in cases) else None
    extras = []
    if 'gradcam' in names:
        extras.append(("Raw Grad-CAM / CAM at layer resolution (4 images of the cheap batch):",
                       [f"{what}: max abs diff {d:.2e}" + (f" (relative to max |map| {s:.3g}: {d / s:.1e})" if s else '')
                        for what, d, s in raw_gradcam_agreement(model, tiers['cheap']['x'], tiers['cheap']['preds'])]))
        if not a.no_checks:
            gc_case = next(c for c in cases if c.method == 'gradcam')
            x, preds = tiers['cheap']['x'], tiers['cheap']['preds']
            mem = []
            for i in [Impl('forward, no_grad', 'torch', plain_forward), gc_case.ours] + [e for e in gc_case.extra if e.key != 'captum LayerGradCam, targets given'] + gc_case.peers:
                mem.append(f"{i.key}: {saved_for_backward(i.fn, model, x, preds) / 2**20:.2f} MiB")
                i.cleanup(model)
            extras.append(("Memory autograd keeps for the backward pass (activations saved by the forward, parameters excluded), Grad-CAM, cheap batch:", mem))
            extras.append(("Where fastai_heatmap's Grad-CAM graph starts (layer4, cheap batch), with other forward hooks reading the layer:", graph_start(model, x, preds)))
            extras.append(("State left on a fresh model (put in train mode, no .grad) by one documented Grad-CAM call:",
                           [f"{n}: {note}" for n, note in state_checks(tiers['cheap']['x'], a.seed)]))
    if not a.no_profile:
        prof = []
        for c in cases:
            m = med[c.tier]
            if not verdict(c, m[c.ours.key], m['forward, no_grad'], {p.key: m[p.key] for p in c.peers if p.summary}).startswith('MISSED'): continue
            t = tiers[c.tier]
            print(f"profiling {c.ours.key} ...", flush=True)
            total, rows, (n_fwd, t_fwd, parts) = profile_call(c.ours.fn, model, t['x'], t['preds'])
            prof.append(f"{c.ours.key} ({c.settings}): {total * 1e3:.0f} ms under cProfile. Model forward passes: {n_fwd}, {t_fwd * 1e3:.0f} ms "
                        f"({t_fwd / total:.0%}; by top-level module: " + ', '.join(f"{k} {v / t_fwd:.0%}" for k, v in parts.items() if v >= 0.01 * t_fwd)
                        + f"); the rest ({(total - t_fwd) * 1e3:.0f} ms) is backward passes and the method's own work. Functions by own time: "
                        + '; '.join(f"{f} x{n}: {tt * 1e3:.0f} ms ({tt / total:.0%})" for f, n, tt in rows))
        if prof: extras.append(("Where the time goes in the methods of ours that missed their target (cProfile, one call, functions by own time):", prof))
    load1 = os.getloadavg()[0]
    report = build_report(a, cases, tiers, med, agree, dead, extras, (load0, load1), started)
    print('\n' + report)
    if a.write:
        Path(a.write).write_text(report)
        print(f"written to {a.write}")


if __name__ == '__main__':
    main()
