"""Speed and agreement of fastai_heatmap's faithfulness metrics against pytorch-grad-cam's and captum's, side by side in one run.

Run it from the repository root:

    python bench/bench_metrics.py                       # 4 images of 112 px, 3 repeats
    python bench/bench_metrics.py --bs 8 --size 224 --repeats 5 --threads 1

For a torchvision ``resnet18(weights=None, num_classes=10)`` in eval mode (seeded random weights, seeded random inputs), the
Grad-CAM maps of ``layer3`` (upsampled, normalized) and each image's predicted class, it times, on the model's device:

* ROAD: ``road(model, xb, maps).combined`` against pytorch-grad-cam's ``ROADCombined()`` (both MoRF and LeRF at the
  percentiles 10 to 90: 18 imputations per image; pytorch-grad-cam solves each with scipy's sparse LU, one image at a time);
* the confidence change: ``confidence_change`` against ``CamMultImageConfidenceChange``;
* infidelity (10 square perturbations): ``infidelity`` against captum's ``infidelity`` with the same perturbations;
* max-sensitivity (10 perturbations, Grad-CAM): ``sensitivity_max`` against captum's ``sensitivity_max`` with the same
  perturbations and our Grad-CAM as its explanation function (so the difference is in the metric, not the method);
* a plain forward pass of the batch under ``torch.no_grad()``: the baseline of every ``x fwd``.

Both sides get the same class (ClassifierOutputSoftmaxTarget: the softmax probability) and, where a peer draws random
numbers, the same draws. Each time is the median over the repeats after one warm-up run; every implementation runs once per
round, round-robin, so that they all see the same machine conditions. After the timings, how far apart the two numbers are.
"""
from __future__ import annotations
import argparse, os, statistics, sys, time, warnings
from pathlib import Path
from unittest import mock
warnings.filterwarnings('ignore')
import torch
try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastai_heatmap.core import heatmap
from fastai_heatmap.faithfulness import road, confidence_change, infidelity, infidelity_perturbations, sensitivity_max
from torchvision.models import resnet18
from pytorch_grad_cam.metrics.road import ROADCombined, NoisyLinearImputer
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
import captum.metrics as cm


def _sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)

def _same_noise(eps):
    "pytorch-grad-cam's imputer, drawing its noise from `eps` (C, H, W) at the pixels it imputes"
    orig, state = NoisyLinearImputer.__call__, {}
    def call(self, img, mask):
        state['missing'] = mask.reshape(-1) == 0
        return orig(self, img, mask)
    def randn_like(t, *args, **kwargs): return eps.reshape(len(eps), -1)[:, state['missing']].to(t.device)
    return mock.patch.object(NoisyLinearImputer, '__call__', call), mock.patch('torch.randn_like', randn_like)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--bs', type=int, default=4, help='images per batch')
    ap.add_argument('--size', type=int, default=112, help='image side in pixels')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None, help="torch's CPU threads (left as they are when not given)")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval().to(dev)
    xb = torch.randn(a.bs, 3, a.size, a.size, generator=torch.Generator().manual_seed(1)).to(dev)
    maps = heatmap(model, xb, method='gradcam', layer='layer3')
    with torch.no_grad(): t = model(xb).argmax(1)
    tg, cams = [ClassifierOutputSoftmaxTarget(int(c)) for c in t], maps.cpu().numpy()
    eps = torch.randn(xb.shape[1:], generator=torch.Generator().manual_seed(0))
    I = infidelity_perturbations(xb.shape[1:], 'square', 10).to(dev)
    d = (0.02 * (2 * torch.rand((10, *xb.shape[1:]), generator=torch.Generator().manual_seed(0)) - 1)).to(dev)
    def pgc_road():
        p, q = _same_noise(eps)
        with p, q: return torch.as_tensor(ROADCombined()(xb, cams, tg, model))
    def cpt_infid():
        def pf(inp):
            k = torch.arange(len(inp), device=inp.device) % 10
            return I[k], torch.where(I[k] > 0, torch.zeros_like(inp), inp)
        return cm.infidelity(lambda x: model(x).softmax(-1), pf, xb, maps[:, None].expand_as(xb).contiguous(), target=t, n_perturb_samples=10, normalize=True)
    def cpt_sens():
        expl = lambda inp, target: (heatmap(model, inp[0] if isinstance(inp, tuple) else inp, target, method='gradcam', layer='layer3'),)
        return cm.sensitivity_max(expl, xb, perturb_func=lambda inp, r=0.02: inp + d[torch.arange(len(inp), device=inp.device) % 10], n_perturb_samples=10, target=t)
    def forward():
        with torch.no_grad(): return model(xb)
    rows = {
        'ROAD combined (18 imputations / image)': (lambda: road(model, xb, maps).combined, pgc_road, 'pytorch-grad-cam ROADCombined'),
        'confidence change': (lambda: (lambda c: c.after - c.before)(confidence_change(model, xb, maps)),
                              lambda: torch.as_tensor(CamMultImageConfidenceChange()(xb, cams, tg, model)), 'pytorch-grad-cam CamMultImageConfidenceChange'),
        'infidelity (10 squares)': (lambda: infidelity(model, xb, maps), cpt_infid, 'captum infidelity'),
        'max-sensitivity (10, Grad-CAM)': (lambda: sensitivity_max(model, xb, method='gradcam', layer='layer3'), cpt_sens, 'captum sensitivity_max'),
    }
    fns = {'forward': forward}
    for k, (ours, peer, _) in rows.items(): fns[k + ' / ours'], fns[k + ' / peer'] = ours, peer
    times, outs = {k: [] for k in fns}, {}
    for f in fns.values(): f(); _sync(dev) # warm-up
    names = list(fns)
    for r in range(a.repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            _sync(dev); t0 = time.perf_counter()
            outs[k] = fns[k](); _sync(dev)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.bs} images of {a.size} px on {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}, {a.repeats} repeats, load {os.getloadavg()[0]:.1f}")
    print(f"forward: {med['forward'] * 1e3:.1f} ms")
    print(f"{'metric':42s} {'ours s':>9s} {'peer s':>9s} {'ours/peer':>9s} {'ours x fwd':>10s} {'max |diff|':>10s}  peer")
    for k, (_, _, peer) in rows.items():
        o, p = med[k + ' / ours'], med[k + ' / peer']
        diff = (outs[k + ' / ours'].float().cpu() - outs[k + ' / peer'].float().cpu()).abs().max().item()
        print(f"{k:42s} {o:9.3f} {p:9.3f} {o / p:9.2f} {o / med['forward']:10.1f} {diff:10.1e}  {peer}")

if __name__ == '__main__': main()
