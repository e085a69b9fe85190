"""Measure changes to the library proposed by bench/benchmark.py's profiles, without making them: each is a subclass here.

Run it from the repository root:

    python bench/proposals.py --threads 1                   # batch of 16 224x224 images; Ablation-CAM on 2 of 96x96
    python bench/proposals.py --threads 1 --bs 4 --size 128 --heavy-bs 1 --heavy-size 64 --repeats 3

Three proposals, each checked to give the same maps as the library (max abs difference printed) and timed side by side
with the library's method (round-robin, median):

1. ``reduce_channels(a, 'max')`` (saliency, input x gradient, guided, rectified, Guided Grad-CAM, integrated gradients)
   picks the channel of largest magnitude with ``a.gather(1, a.abs().argmax(1, keepdim=True))``. On the CPU, an argmax
   over the channel dimension of a (B, 3, H, W) tensor is a slow strided reduction (about 0.2 s for 16x3x224x224 on one
   thread, 15% of a resnet18 forward). ``mx, mn = a.amax(1), a.amin(1); torch.where(mx >= -mn, mx, mn)`` gives the same
   values (ties between +v and -v aside) about 20x faster.
2. Guided backpropagation's ReLU goes back as ``g.clamp_min(0) * (out > 0)`` (three passes over the tensor and a bool
   mask); ``torch.ops.aten.threshold_backward(g.clamp_min(0), out, 0)`` is what autograd's own ReLU backward uses.
3. Ablation-CAM runs the whole model for every ablated copy (``Context.run_with_layer``): the layers before the explained
   layer compute the same thing for every copy of an image, and the layer's own output is computed and then thrown
   away. (a) replacing the layer's forward by the ablated activations (as pytorch-grad-cam's AblationLayer does) saves
   the layer; (b) running the model once per image, with the layer's forward returning the stack of ablated copies, saves
   the layers before it too. (b) relies on everything after the layer taking its batch from the layer's output (tensors
   from before the layer have batch 1 and broadcast): true of a classifier whose later layers only see the layer's
   output, not guaranteed for any model (a library would need a check and the current path as fallback).
"""
from __future__ import annotations
import argparse, os, statistics, sys, time, warnings
from pathlib import Path

os.environ.setdefault('TQDM_DISABLE', '1')
import torch
from torch import Tensor

warnings.filterwarnings('ignore')
try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastai_heatmap.core import heatmap
from fastai_heatmap.cam import AblationCAM
from fastai_heatmap.gradients import Saliency, GuidedBackprop, ReLURule
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import make_model, plain_forward, pgc_ablation_fn, clear_grads  # noqa: E402


def fast_max_channel(a:Tensor)->Tensor:
    "The value of the channel of largest magnitude (B, H, W), without argmax"
    mx, mn = a.amax(1), a.amin(1)
    return torch.where(mx >= -mn, mx, mn)

class FastSaliency(Saliency):
    def map(self, ctx): return fast_max_channel(self.attribute(ctx))

class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out
    @staticmethod
    def backward(ctx, g):
        out, = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g.clamp_min(0), out, 0)

class FusedGuidedRule(ReLURule):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._relus:
            self.count += 1
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))

class FastGuided(GuidedBackprop):
    def map(self, ctx): return fast_max_channel(self.attribute(ctx))

class FastFusedGuided(FastGuided):
    def backward_rule(self): return FusedGuidedRule('guided')


class LayerOutput:
    "Under it, `m`'s forward does not run: it returns `value`"
    def __init__(self, m, value): self.m, self.value = m, value
    def __enter__(self): self.m.forward = lambda *a, **k: self.value
    def __exit__(self, *a): del self.m.forward

def _alive_pairs(acts): return torch.where(acts.flatten(2).ne(0).any(2))

class AblationSkipLayer(AblationCAM):
    "(a): the ablated copies run the layers before the layer, not the layer"
    def _logits(self, ctx):
        if 'ablation' in ctx.cache: return ctx.cache['ablation']
        b, k = _alive_pairs(ctx.acts)
        out = ctx.preds.new_zeros(len(b), ctx.preds.shape[1])
        for sl in ctx.chunks(len(b)):
            a = ctx.acts[b[sl]].clone()
            a[torch.arange(len(a)), k[sl]] = 0
            with LayerOutput(ctx.layer, a.to(ctx.act_dtype)), torch.no_grad(), ctx.autocast(): out[sl] = ctx.model(ctx.x[b[sl]]).float()
        ctx.cache['ablation'] = (b, k, out)
        return ctx.cache['ablation']

class AblationOncePerImage(AblationCAM):
    "(b): one forward of each image, whose layer returns the stack of its ablated copies"
    def _logits(self, ctx):
        if 'ablation' in ctx.cache: return ctx.cache['ablation']
        b, k = _alive_pairs(ctx.acts)
        out = ctx.preds.new_zeros(len(b), ctx.preds.shape[1])
        for i in range(len(ctx.x)):
            idx = torch.where(b == i)[0]
            for s in range(0, len(idx), ctx.batch_size):
                j = idx[s:s + ctx.batch_size]
                a = ctx.acts[i].expand(len(j), *ctx.acts.shape[1:]).clone()
                a[torch.arange(len(j)), k[j]] = 0
                with LayerOutput(ctx.layer, a.to(ctx.act_dtype)), torch.no_grad(), ctx.autocast(): out[j] = ctx.model(ctx.x[i:i + 1]).float()
        ctx.cache['ablation'] = (b, k, out)
        return ctx.cache['ablation']


def hm(method, layer=None, **kw):
    return lambda m, x, p: heatmap(m, x, method=method, layer=layer, bar=False, **kw)

def run(model, x, fns, repeats, checks):
    "Time `fns` round-robin; `checks` maps a variant to the library's method it must reproduce"
    with torch.no_grad(): preds = model(x).argmax(1)
    for k, ref in checks.items():
        d = (fns[k](model, x, preds) - fns[ref](model, x, preds)).abs().max().item()
        print(f"  {k}: max abs diff to {ref!r}: {d:.1e}")
    times, keys = {k: [] for k in fns}, list(fns)
    for k in keys: fns[k](model, x, preds); clear_grads(model)  # warm-up
    for r in range(repeats):
        for i in range(len(keys)):
            k = keys[(i + r) % len(keys)]
            t0 = time.perf_counter(); fns[k](model, x, preds); times[k].append(time.perf_counter() - t0); clear_grads(model)
    base = statistics.median(times['forward, no_grad'])
    for k, v in times.items():
        print(f"  {k:52s} {statistics.median(v) * 1e3:9.1f} ms {statistics.median(v) / base:7.2f}x fwd   ({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--bs', type=int, default=16); p.add_argument('--size', type=int, default=224)
    p.add_argument('--heavy-bs', type=int, default=2); p.add_argument('--heavy-size', type=int, default=96)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--repeats', type=int, default=5); p.add_argument('--threads', type=int, default=None)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    model = make_model().eval()
    x = torch.randn(a.bs, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    print(f"\n1-2. input-gradient maps, batch {tuple(x.shape)}:")
    run(model, x, {'forward, no_grad': plain_forward,
                   'saliency (library)': hm('saliency'),
                   'saliency, max channel without argmax': hm(FastSaliency()),
                   'guided (library)': hm('guided'),
                   'guided, max channel without argmax': hm(FastGuided()),
                   'guided, that + threshold_backward': hm(FastFusedGuided())}, a.repeats,
        {'saliency, max channel without argmax': 'saliency (library)', 'guided, max channel without argmax': 'guided (library)',
         'guided, that + threshold_backward': 'guided (library)'})
    xh = torch.randn(a.heavy_bs, 3, a.heavy_size, a.heavy_size, generator=torch.Generator().manual_seed(1))
    print(f"\n3. Ablation-CAM at layer4, batch {tuple(xh.shape)}, batch_size={a.batch_size}:")
    fns = {'forward, no_grad': plain_forward,
           'ablationcam (library)': hm('ablationcam', 'layer4', batch_size=a.batch_size),
           '(a) layer not run for the ablated copies': hm(AblationSkipLayer(), 'layer4', batch_size=a.batch_size),
           '(b) one forward per image up to the layer': hm(AblationOncePerImage(), 'layer4', batch_size=a.batch_size)}
    try: fns['pytorch-grad-cam AblationCAM'] = pgc_ablation_fn(a.batch_size)
    except Exception: pass
    run(model, xh, fns, a.repeats, {k: 'ablationcam (library)' for k in fns if k.startswith('(')})


if __name__ == '__main__':
    main()
