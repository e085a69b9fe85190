"""The GPU path, checked against the CPU (issue 15 §5): on a learner moved to `--device` (and with `to_fp16()`), every registered
method (`list_methods()`), `show_cam`, top losses, class heatmaps and the command line's writer (`explain_files`, maps saved as .npy),
each compared with the same call on the CPU: maps equal to `--atol` (1e-3) in fp32, correlation ≥ 0.99 in fp16. Then the cost of
Grad-CAM and CAM relative to a forward on the device. One printed table; exits 1 if a check fails.

The learner has fixed weights (a seeded, untrained CNN with a pooling → linear head, so that CAM applies) on the generated digits: nothing
is trained or downloaded, and both devices explain the same model.

    python bench/gpu_check.py                      # on CUDA, every method (< 5 minutes on one GPU)
    python bench/gpu_check.py --device cpu --quick # dry run here: CPU against CPU (fp16 skipped: fastai's mixed precision is CUDA-only)
    python bench/gpu_check.py --methods gradcam,cam --quick
"""
import argparse, sys, tempfile, time, warnings
from pathlib import Path
import numpy as np, torch
from torch import nn

ROW = "{:<34} {:>11} {:>6} {:>11} {:>6} {:>8}"


def make_learner(n_items, device='cpu', fp16=False):
    """A seeded untrained CNN on the digits, on `device` (with `to_fp16()` when asked), and its first validation items: fixed weights,
    the same model on every device and every run"""
    from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, GrandparentSplitter, get_image_files, parent_label, Normalize,
                                   imagenet_stats, Learner, CrossEntropyLossFlat, ProgressCallback)
    from fastai_heatmap.data import make_digits
    dls = DataBlock((ImageBlock, CategoryBlock), get_items=get_image_files, splitter=GrandparentSplitter(valid_name='valid'), get_y=parent_label,
                    batch_tfms=Normalize.from_stats(*imagenet_stats)).dataloaders(make_digits(), bs=32, num_workers=0, device=device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(dls.vocab)))
    learn = Learner(dls, model.to(device), loss_func=CrossEntropyLossFlat())
    learn.remove_cb(ProgressCallback)
    return (learn.to_fp16() if fp16 else learn), list(dls.valid_ds.items[:n_items])


def compare(a, b):
    "(max |a − b|, correlation) of two sets of maps"
    a, b = (torch.from_numpy(np.array(x, dtype=np.float64)).flatten() for x in (a, b))
    ok = torch.isfinite(a) & torch.isfinite(b)
    if not ok.all(): return float('inf'), float('nan')
    d = (a - b).abs().max().item()
    c = 1.0 if d == 0 else torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return d, c


def surfaces(learn, items, methods, tmp):
    "name → maps (numpy) of each checked call on `learn`"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from fastai_heatmap.all import HeatmapInterpretation
    from fastai_heatmap.cli import explain_files
    out = {}
    for m in methods:
        try: out[f"method {m}"] = learn.explain(items, method=m, bar=False).maps.float().cpu().numpy()
        except Exception as e: out[f"method {m}"] = e
    ax = learn.show_cam(items[0])
    out['show_cam'] = np.asarray(ax.get_images()[1].get_array(), dtype=np.float32); plt.close('all')
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(items, with_labels=True))
    fig = interp.plot_top_losses(min(4, len(items)))
    out['plot_top_losses'] = np.stack([np.asarray(a.get_images()[1].get_array(), dtype=np.float32) for a in fig.axes if len(a.get_images()) > 1])
    plt.close('all')
    out['class_heatmaps'] = interp.class_heatmaps(max_n=4).maps.numpy()
    d = Path(tmp)/str(next(learn.model.parameters()).device).replace(':', '')
    explain_files(learn, items, d, save_maps=True, bar=False)
    out['CLI explain (.npy maps)'] = np.stack([np.load(f) for f in sorted(d.glob('*.npy'))])
    return out


def cost(learn, xb, method, repeats):
    "Seconds of `method` on batch `xb`, over seconds of a forward, on the learner's device"
    from fastai_heatmap.core import explain
    dev = xb.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    def timed(f):
        f(); sync() # warm up
        t = time.perf_counter()
        for _ in range(repeats): f()
        sync(); return (time.perf_counter() - t) / repeats
    model = learn.model.eval()
    with torch.no_grad(): fwd = timed(lambda: model(xb))
    return timed(lambda: explain(model, xb, method=method, bar=False)) / fwd, fwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', help="Device to check against the CPU (default: cuda)")
    p.add_argument('--methods', default=None, help="Comma-separated method names (default: every registered method)")
    p.add_argument('--quick', action='store_true', help="4 images, 2 timing repeats (a dry run)")
    p.add_argument('--atol', type=float, default=1e-3, help="fp32: largest |Δ| allowed between the maps (default 1e-3)")
    p.add_argument('--min-corr', type=float, default=0.99, help="fp16: smallest correlation allowed (default 0.99)")
    a = p.parse_args(argv)
    warnings.filterwarnings('ignore')
    from fastai_heatmap.all import list_methods
    t0 = time.time()
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("No CUDA device here: run with --device cpu for a dry run.")
    methods = a.methods.split(',') if a.methods else list(list_methods().name)
    n = 4 if a.quick else 16
    fp16 = device.type == 'cuda' # fastai's MixedPrecision (and `autocast_of`) are CUDA-only: elsewhere fp16 would be fp32 again
    with tempfile.TemporaryDirectory() as tmp:
        ref = surfaces(*make_learner(n, 'cpu'), methods, tmp + '/cpu')
        got = surfaces(*make_learner(n, device), methods, tmp + '/dev')
        half = surfaces(*make_learner(n, device, fp16=True), methods, tmp + '/half') if fp16 else None
    print(f"fastai_heatmap GPU check: {device} against cpu, {n} images, {len(methods)} methods; torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == 'cuda' else ''))
    print(ROW.format('check', 'fp32 max|Δ|', 'ok', 'fp16 corr', 'ok', ''))
    bad = 0
    for k, r in ref.items():
        if isinstance(r, Exception):
            print(ROW.format(k, 'n/a', '-', 'n/a', '-', '')[:80] + f"  ({type(r).__name__}: {str(r)[:60]})"); continue
        g = got[k]
        if isinstance(g, Exception): print(ROW.format(k, 'error', 'FAIL', '', '', '') + f"  ({type(g).__name__}: {str(g)[:60]})"); bad += 1; continue
        d, _ = compare(r, g)
        ok32 = d <= a.atol
        if half is not None:
            h = half[k]
            c = compare(r, h)[1] if not isinstance(h, Exception) else float('nan')
            ok16 = c >= a.min_corr
            s16, o16 = f"{c:.4f}", 'ok' if ok16 else 'FAIL'
        else: ok16, s16, o16 = True, 'skipped', '-'
        bad += (not ok32) + (not ok16)
        print(ROW.format(k, f"{d:.2e}", 'ok' if ok32 else 'FAIL', s16, o16, ''))
    learn, items = make_learner(n, device)
    xb = learn.dls.test_dl(items * (1 if a.quick else 4), bs=64, num_workers=0).one_batch()[0].as_subclass(torch.Tensor)
    for m in ('gradcam', 'cam'):
        r, fwd = cost(learn, xb, m, 2 if a.quick else 20)
        print(f"cost of {m} on {device}: {r:.1f}× a forward ({fwd*1e3:.2f} ms per forward of {len(xb)} images)")
    print(f"{bad} check{'s' if bad != 1 else ''} failed; {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == '__main__': sys.exit(main())
