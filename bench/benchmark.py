"""Speed and agreement of fastai_heatmap's Grad-CAM / CAM against pytorch-grad-cam, torchcam and captum.

Run it from the repository root:

    python bench/benchmark.py                      # resnet18, batch of 16 random 224x224 images
    python bench/benchmark.py --bs 8 --size 160 --repeats 9 --threads 2

What it measures, for a torchvision ``resnet18(weights=None, num_classes=10)`` in eval mode on the CPU
(random weights, random inputs; torch's thread count is left as it is unless ``--threads`` is given):

  1. a plain forward pass under ``torch.no_grad()`` (the baseline every ratio ``x fwd`` refers to);
  2. a plain forward + full backward (``model(x)[range, t].sum().backward()``, parameters requiring grad), for context;
  3. ``fastai_heatmap.heatmap(model, x, method='gradcam', layer='layer4')`` (defaults: upsampled to the input
     size and min-max normalized per image), plus the same at layer resolution without normalization;
  4. ``fastai_heatmap.heatmap(model, x, method='cam', layer='layer4')``;
  5. pytorch-grad-cam ``GradCAM(model, target_layers=[model.layer4[-1]])`` called with
     ``targets=[ClassifierOutputTarget(c) ...]`` inside its ``with`` block (its output: numpy maps normalized
     and resized to the input size with cv2);
  6. torchcam ``GradCAM(model, 'layer4')`` used as its docs show (``with`` block, ``scores = model(x)``,
     ``extractor(class_idx, scores)``), followed by ``F.interpolate`` to the input size, since torchcam returns
     layer-resolution maps (normalized by default) and a user needs input-size maps to overlay;
  7. captum ``LayerGradCam(model, model.layer4).attribute(x, target=preds)`` followed by
     ``LayerAttribution.interpolate(..., (H, W), 'bilinear')``; captum needs the targets before its forward pass,
     so an extra row also counts the ``no_grad`` forward a user needs to get the predicted classes.

Every method explains the model's predicted class for each sample (computed once with a ``no_grad`` forward and
passed explicitly to the libraries that take targets; fastai_heatmap uses ``targets=None``, i.e. the prediction).
Each time is the median over ``--repeats`` runs after one warm-up run of each; the methods are interleaved
(round-robin, with a rotating start) in one process so that they see the same machine conditions. Per-call
construction of the libraries' extractor objects (hook registration) is included, as in their documented usage.

After the timings it prints:
  * how much memory autograd keeps for the backward pass in each method (tensors saved during the forward);
  * how well the maps agree: fastai_heatmap's raw layer-resolution Grad-CAM (``upsample=False, norm=None``)
    against captum's raw LayerGradCam and torchcam's ``normalized=False`` maps; fastai_heatmap's default
    (upsampled, normalized) map against pytorch-grad-cam's (which only gives normalized, resized maps);
    fastai_heatmap's raw CAM against torchcam's raw CAM;
  * what state each library leaves the model in (hooks, ``.grad``, training flags, BatchNorm running stats),
    checked on a fresh model put in *train* mode so that changes to the flags are visible.
"""
from __future__ import annotations
import argparse, gc, os, statistics, sys, time, warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)

try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastai_heatmap.core import heatmap
from torchvision.models import resnet18

try:
    from pytorch_grad_cam import GradCAM as PGGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError: PGGradCAM = None
try: from torchcam.methods import GradCAM as TCGradCAM, CAM as TCCAM
except ImportError: TCGradCAM = TCCAM = None
try: from captum.attr import LayerGradCam, LayerAttribution
except ImportError: LayerGradCam = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--bs', type=int, default=16, help='batch size (default 16)')
    p.add_argument('--size', type=int, default=224, help='image height and width (default 224)')
    p.add_argument('--repeats', type=int, default=7, help='timed runs of each method; the median is reported (default 7)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads; default: leave as is')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def make_model(seed=0):
    torch.manual_seed(seed)
    return resnet18(weights=None, num_classes=10)


# ---------------------------------------------------------------------------------------------- the methods
# Each returns its maps (so nothing is optimised away and the agreement check can reuse them).

def plain_forward(model, x, preds):
    with torch.no_grad(): return model(x)

def forward_backward(model, x, preds):
    out = model(x)
    out[torch.arange(len(x)), preds].sum().backward()
    return out.detach()

def fh_gradcam(model, x, preds): return heatmap(model, x, method='gradcam', layer='layer4')
def fh_gradcam_raw(model, x, preds): return heatmap(model, x, method='gradcam', layer='layer4', upsample=False, norm=None)
def fh_cam(model, x, preds): return heatmap(model, x, method='cam', layer='layer4')

def pgc_gradcam(model, x, preds):
    # Documented usage: the `with` block releases the hooks; the call normalizes and cv2-resizes to the input size
    with PGGradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds])

def torchcam_gradcam(model, x, preds):
    # Documented usage: extractor as a context manager, forward with grad inside it, then call it with the scores;
    # the maps come at layer resolution (normalized): upsample them to overlay them on the images
    with TCGradCAM(model, 'layer4') as extractor:
        scores = model(x)
        cams = extractor(scores.argmax(1).tolist(), scores)[0]
    return F.interpolate(cams[:, None], size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]

def captum_gradcam(model, x, preds):
    attr = LayerGradCam(model, model.layer4).attribute(x, target=preds)
    return LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), 'bilinear')[:, 0].detach()

def captum_gradcam_with_preds(model, x, preds):
    with torch.no_grad(): p = model(x).argmax(1)
    return captum_gradcam(model, x, p)


def clear_grads(model): model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- timing
def time_all(model, x, preds, methods, repeats):
    "Median wall time (s) of each method; one warm-up each, then `repeats` interleaved rounds"
    times = {name: [] for name, *_ in methods}
    for name, fn, cleanup in methods:  # warm-up
        fn(model, x, preds); cleanup(model)
    n = len(methods)
    for r in range(repeats):
        for i in range(n):
            name, fn, cleanup = methods[(i + r) % n]
            gc.collect()
            t0 = time.perf_counter()
            out = fn(model, x, preds)
            times[name].append(time.perf_counter() - t0)
            del out
            cleanup(model)
    return {k: statistics.median(v) for k, v in times.items()}


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


# ---------------------------------------------------------------------------------------------- agreement
def minmax(m):
    lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)

def agreement(model, x, preds):
    "(what, max abs diff, scale) rows comparing fastai_heatmap's maps with each library's"
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
    if PGGradCAM is not None:
        full = heatmap(model, x, targets=preds, method='gradcam', layer='layer4')  # upsampled + min-max per image
        with PGGradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            pg = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds]))
        clear_grads(model)
        rows.append(('pytorch-grad-cam GradCAM, normalized, input res (vs our default)', (full - pg).abs().max().item(), 1.0))
    if TCCAM is not None:
        # torchcam's CAM applies no ReLU (whatever its docstring's formula says): compare our signed map (relu=False)
        cam_raw = heatmap(model, x, targets=preds, method='cam', layer='layer4', upsample=False, norm=None, relu=False).detach()
        with TCCAM(model, 'layer4', 'fc') as ex:
            with torch.no_grad(): model(x)
            tcc = ex(preds.tolist(), normalized=False)[0]
        rows.append(('torchcam CAM, raw, layer res (vs our relu=False)', (cam_raw - tcc).abs().max().item(), cam_raw.abs().max().item()))
        # For a GAP -> Linear head, Grad-CAM's weights are the fc weights / (h*w): the two maps differ by that factor only
        hw = raw.shape[-2] * raw.shape[-1]
        rows.append((f'our CAM vs our Grad-CAM x h*w ({hw}), raw', (cam_raw.relu() - raw * hw).abs().max().item(), cam_raw.abs().max().item()))
    return rows


# ---------------------------------------------------------------------------------------------- state left behind
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
    checks = [('fastai_heatmap heatmap (gradcam)', lambda m: fh_gradcam(m, x, preds)),
              ('fastai_heatmap heatmap (cam)', lambda m: fh_cam(m, x, preds))]
    if PGGradCAM is not None:
        checks.append(('pytorch-grad-cam, `with` block', lambda m: pgc_gradcam(m, x, preds)))
        def pg_no_with(m):  # an object kept around (e.g. reused over batches), as in many tutorials
            cam = PGGradCAM(model=m, target_layers=[m.layer4[-1]])
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in preds])
            pg_no_with.keep = cam
            return out
        checks.append(('pytorch-grad-cam, object kept alive', pg_no_with))
    if TCGradCAM is not None: checks.append(('torchcam GradCAM, `with` block', lambda m: torchcam_gradcam(m, x, preds)))
    if LayerGradCam is not None: checks.append(('captum LayerGradCam', lambda m: captum_gradcam(m, x, preds)))
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


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    model = make_model(args.seed).eval()
    x = torch.randn(args.bs, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad(): preds = model(x).argmax(1)

    import torchvision
    vers = [f'torch {torch.__version__}', f'torchvision {torchvision.__version__}', f'fastai_heatmap {getattr(fastai_heatmap, "__version__", "?")}']
    for mod, label in (('pytorch_grad_cam', 'grad-cam'), ('torchcam', 'torchcam'), ('captum', 'captum')):
        try:
            from importlib.metadata import version
            vers.append(f'{label} {version(label)}')
        except Exception: vers.append(f'{label} missing')
    print(f"resnet18(weights=None, num_classes=10), eval, CPU; batch {args.bs}x3x{args.size}x{args.size}; "
          f"{torch.get_num_threads()} torch threads; median of {args.repeats} (after 1 warm-up), interleaved")
    print('; '.join(vers))
    load, ncpu = os.getloadavg()[0], os.cpu_count() or 1
    print(f"load average {load:.1f} on {ncpu} CPUs" + (
        " -- WARNING: other processes are using the CPUs; timings are noisy and torch's OpenMP threads may stall "
        "(try --threads 1, or rerun on an idle machine)" if load > ncpu - 0.5 else ''))
    print(f"predicted classes explained: {preds.tolist()}\n")

    nothing = lambda m: None
    methods = [('forward, no_grad (baseline)', plain_forward, nothing),
               ('forward + full backward', forward_backward, clear_grads),
               ('fastai_heatmap gradcam (upsample+norm)', fh_gradcam, nothing),
               ('fastai_heatmap gradcam (layer res, raw)', fh_gradcam_raw, nothing),
               ('fastai_heatmap cam (upsample+norm)', fh_cam, nothing)]
    if PGGradCAM is not None: methods.append(('pytorch-grad-cam GradCAM (norm+resize)', pgc_gradcam, clear_grads))
    if TCGradCAM is not None: methods.append(('torchcam GradCAM (+F.interpolate)', torchcam_gradcam, clear_grads))
    if LayerGradCam is not None:
        methods.append(('captum LayerGradCam (+interpolate)', captum_gradcam, clear_grads))
        methods.append(('  same + no_grad forward for preds', captum_gradcam_with_preds, clear_grads))
    med = time_all(model, x, preds, methods, args.repeats)

    base, ours = med['forward, no_grad (baseline)'], med['fastai_heatmap gradcam (upsample+norm)']
    w = max(len(n) for n in med) + 2
    print(f"{'method':<{w}}{'ms':>9}{'x fwd':>8}{'x fh gradcam':>14}")
    print('-' * (w + 31))
    for name, _, _ in methods:
        t = med[name]
        print(f"{name:<{w}}{t*1e3:9.1f}{t/base:8.2f}{t/ours:14.2f}")
    print("\nNotes: pytorch-grad-cam returns numpy maps, min-max normalized and cv2-resized to the input size. "
          "torchcam returns layer-resolution maps, min-max normalized by default; the F.interpolate to the input size is included. "
          "captum returns raw (signed: relu_attributions=False by default) layer-resolution maps; its interpolate is included, no normalization. "
          "The three libraries run the whole forward pass with grad enabled (fastai_heatmap records the graph only from the hooked layer on); "
          "torchcam and captum then differentiate with respect to the layer's output only (torch.autograd.grad), as fastai_heatmap does, "
          "while pytorch-grad-cam calls loss.backward() through the whole network, filling every parameter's .grad.")

    print("\nMemory autograd keeps for the backward pass (activations saved by the forward, parameters excluded), one call each:")
    for name, fn, cleanup in methods:
        if name.startswith('  '): continue
        print(f"  {name:<{w}}{saved_for_backward(fn, model, x, preds) / 2**20:9.2f} MiB")
        cleanup(model)

    print("\nAgreement with fastai_heatmap's Grad-CAM at layer4 (same predicted classes):")
    for what, d, scale in agreement(model, x, preds):
        rel = f" (relative to max |map| {scale:.3g}: {d/scale:.1e})" if scale != 1.0 else ''
        print(f"  {what}: max abs diff {d:.2e}{rel}")
    clear_grads(model)

    print("\nState left on a fresh model (put in train mode, no .grad) by one documented call:")
    for name, note in state_checks(x, args.seed):
        print(f"  {name}: {note}")


if __name__ == '__main__':
    main()
