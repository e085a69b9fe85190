"""Memory of the audit report's pass over a dataset, against the number of images (issue 19: "a report over 20,000 images
uses no more memory than over 2,000").

Run it from the repository root:

    python bench/report_memory.py                  # 2,000 and 20,000 images
    python bench/report_memory.py --n 500 5000     # other sizes

Each size runs `model_report` (every section: per-class sums, confusion, top losses, faithfulness sample, sanity check,
the page written) in a fresh Python process, on a fixed-weight CNN (seeded, untrained) over synthetic 32×32 images made
from each item's index as the batch is loaded (no files, so the dataset itself is one list of ints). Measured in that
process, from the moment the `DataLoader` is built:

* torch: the bytes of the tensors alive, summed over their distinct storages (found with `gc`), after every batch the
  report adds to its sums (`Tally.add`, wrapped to count) and once at the end — the largest of them;
* Python: `tracemalloc`'s peak over the whole report (Python objects: lists, DataFrames' Python parts, the page's text);
* the process: the rise of its peak resident memory (VmHWM, reset through /proc/self/clear_refs after the set-up), which
  also holds the allocator's slack and every transient buffer.

A flat report keeps the first two the same whatever the number of images, but for a few numbers per image (one row
of 4 float32 per image in `Tally.rows`, the losses of the top-loss view): that part is printed on its own.
"""
import argparse, gc, json, os, subprocess, sys, tempfile, time, tracemalloc, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(n:int, out:str):
    warnings.filterwarnings('ignore')
    sys.path.insert(0, str(ROOT))
    import numpy as np, torch
    from torch import nn
    from fastai.vision.all import (DataBlock, TransformBlock, CategoryBlock, ToTensor, IntToFloatTensor, PILImage, Learner,
                                   CrossEntropyLossFlat, Normalize, imagenet_stats)
    from fastai_heatmap import report as R
    torch.manual_seed(0)

    def make_img(i):
        "A 32×32 image from the index: a bright square at a place set by the index, on grey noise"
        g = np.random.default_rng(int(i))
        a = (g.random((32, 32, 3)) * 60 + 90).astype(np.uint8)
        y, x = (int(i) * 7) % 20, (int(i) * 13) % 20
        a[y:y+10, x:x+10] = 230
        return PILImage.create(a)

    dblock = DataBlock(blocks=(TransformBlock(type_tfms=make_img, batch_tfms=IntToFloatTensor), CategoryBlock), get_y=lambda i: str(int(i) % 4),
                       item_tfms=ToTensor, batch_tfms=Normalize.from_stats(*imagenet_stats), splitter=lambda o: (list(range(len(o) - 8)), list(range(len(o) - 8, len(o)))))
    dls = dblock.dataloaders(list(range(64)), bs=64, num_workers=0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU()),
                          nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
    dl = dls.test_dl(list(range(n)), with_labels=True, bs=64)

    def tensor_bytes():
        seen, total = set(), 0
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and o.device.type == 'cpu':
                    s = o.untyped_storage()
                    if s.data_ptr() not in seen: seen.add(s.data_ptr()); total += s.nbytes()
            except Exception: pass
        return total

    samples, adds = [], [0]
    add = R.Tally.add
    def counted(self, *a, **k):
        add(self, *a, **k)
        adds[0] += 1
        if adds[0] % 8 == 1: samples.append(tensor_bytes()) # every 8th batch: the scan costs more than the batch
    R.Tally.add = counted
    gc.collect()
    base_t = tensor_bytes()
    try: Path('/proc/self/clear_refs').write_text('5')  # reset the peak resident memory
    except OSError: pass
    def hwm():
        try: return next(int(l.split()[1]) * 1024 for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))
        except (OSError, StopIteration): return 0
    rss0 = hwm()
    tracemalloc.start()
    t = time.perf_counter()
    with learn.no_bar(): rep = R.model_report(learn, dl, Path(out).with_suffix('.html'), k=16, faith_n=16, sanity_n=4, bar=False)
    secs = time.perf_counter() - t
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    samples.append(tensor_bytes())
    Path(out).write_text(json.dumps(dict(n=n, images=rep.run['images'], batches=adds[0], seconds=secs, tensors_before=base_t,
                                         tensors_peak=max(samples), tensors_end=samples[-1], python_peak=py_peak, rss_rise=hwm() - rss0,
                                         per_image_rows=n * 4 * 4, samples=samples)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, nargs='+', default=[2000, 20000])
    p.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child: return child(int(a.child[0]), a.child[1])
    res = []
    with tempfile.TemporaryDirectory() as d:
        for n in a.n:
            out = Path(d)/f'm{n}.json'
            subprocess.run([sys.executable, __file__, '--child', str(n), str(out)], check=True)
            res.append(json.loads(out.read_text()))
    mb = lambda v: f"{v / 2**20:8.2f}"
    print(f"model_report over synthetic 32×32 images, fixed-weight CNN, a fresh process per size; MiB (torch tensors: bytes alive beyond those before the report)")
    print(f"{'images':>8s} {'batches':>8s} {'s':>7s} {'torch peak':>11s} {'torch end':>10s} {'python peak':>12s} {'RSS rise':>9s} {'4 floats/image':>15s}")
    for r in res:
        print(f"{r['n']:8d} {r['batches']:8d} {r['seconds']:7.1f} {mb(r['tensors_peak'] - r['tensors_before']):>11s} {mb(r['tensors_end'] - r['tensors_before']):>10s} "
              f"{mb(r['python_peak']):>12s} {mb(r['rss_rise']):>9s} {mb(r['per_image_rows']):>15s}")


if __name__ == '__main__': main()
