"""Dataset-scale cost of fastai_heatmap against fastai's own inference on the same files, side by side in one run (issue 19):

* `learn.heatmap(files)` (Grad-CAM) against `learn.get_preds(dl=learn.dls.test_dl(files))`                     goal ≤ 1.1×;
  CAM the same, on the demo's body with a global-average-pooling → Linear head (which CAM needs; fastai's is not one)
* `fastai-heatmap explain model.pkl folder --out ...` (every PNG written) against a process that runs
  `load_learner` + `get_preds` on the same folder (both timed as whole processes: start, imports, loading)     goal ≤ 1.3×
* `model_report(learn, dl, 'report.html')` (one page, every section) against `get_preds` on the same items plus
  the report's faithfulness sample computed alone (the same methods, images and steps)                           goal ≤ 2×

Run it from the repository root (it uses the demo learner, trained once and cached; the first run trains it):

    python bench/bench_dataset.py              # 640 files, 320 for the command line, 1,000 for the report, 5 rounds
    python bench/bench_dataset.py --quick      # 64, 64 and 128 files, 3 rounds
    python bench/bench_dataset.py --only heatmap --workers 2   # the learner's DataLoaders with 2 workers, and in-process loading beside them

The files are digits PNGs generated once into a temporary folder (`make_digits` with another seed: images the model has not
seen, in folders named after their labels). Every case runs once per round, round-robin with a rotating start, after one
warm-up round, so that they share the machine's conditions (other processes' load included: the load average is printed);
each ratio is that of the cases' medians over the rounds (the median of the per-round ratios is printed beside it).
Torch's thread count is left as the environment sets it (OMP_NUM_THREADS); it is printed.
"""
import argparse, contextlib, os, platform, shutil, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
import matplotlib
matplotlib.use('Agg')

warnings.filterwarnings('ignore')
try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch import nn
import fastai
from fastai.vision.all import get_image_files, Learner, vision_learner, resnet18, accuracy
from fastai_heatmap.all import demo_learner, digits_dls, make_digits, model_report, heatmap_faithfulness, explain_dl

ROOT = Path(__file__).resolve().parents[1]

GET_PREDS = """
import sys, warnings
warnings.filterwarnings('ignore')
from fastai.vision.all import load_learner, get_image_files
learn = load_learner(sys.argv[1])
with learn.no_bar(): learn.get_preds(dl=learn.dls.test_dl(sorted(get_image_files(sys.argv[2]))))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='small sets and 3 rounds')
    p.add_argument('--n', type=int, default=None, help='files for learn.heatmap vs get_preds (640; --quick 64)')
    p.add_argument('--cli-n', type=int, default=None, help='files for fastai-heatmap explain (320; --quick 64)')
    p.add_argument('--report-n', type=int, default=None, help='images of the report (1000; --quick 128)')
    p.add_argument('--repeats', type=int, default=None, help='rounds (5; --quick 3)')
    p.add_argument('--only', default='heatmap,explain,report', help='comma-separated groups to run: heatmap, explain, report')
    p.add_argument('--untrained', action='store_true', help="a seeded untrained resnet18 of the demo's shape instead of the trained demo (the times do not depend on the weights)")
    p.add_argument('--workers', type=int, default=None, help="the learner's DataLoader workers (num_workers; the demo's are 0): get_preds and learn.heatmap use them, "
                   "and a case loading learn.heatmap's items in-process (num_workers=0, as before issue 19) runs beside them")
    p.add_argument('--keep', default=None, help='keep the generated files and outputs in this folder')
    a = p.parse_args(argv)
    q = a.quick
    a.n = a.n or (64 if q else 640)
    a.cli_n = a.cli_n or (64 if q else 320)
    a.report_n = a.report_n or (128 if q else 1000)
    a.repeats = a.repeats or (3 if q else 5)
    a.only = set(a.only.split(','))
    return a


def make_files(root:Path, n:int):
    "`n` digits PNG files in label folders under `root` (generated with a seed the demo was not trained on)"
    per = -(-n // 576) # the training split holds 576 digits of the four classes per copy
    data = make_digits(root/'digits', copies=max(1, per), seed=7)
    files = sorted(get_image_files(data/'train'))
    g = torch.Generator().manual_seed(0)
    return [files[i] for i in sorted(torch.randperm(len(files), generator=g)[:n].tolist())]


def folder_of(files, dest:Path):
    "A folder holding (links to) `files` in their label folders: what the command line is pointed at"
    for f in files:
        d = dest/f.parent.name; d.mkdir(parents=True, exist_ok=True)
        (d/f.name).symlink_to(f)
    return dest


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run_proc(args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)
    if r.returncode != 0: raise RuntimeError(f"{args} failed ({r.returncode}):\n{r.stderr[-3000:]}")


def main(argv=None):
    a = parse_args(argv)
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix='bench_dataset_'))
    tmp.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    learn = vision_learner(digits_dls(), resnet18, pretrained=False, metrics=accuracy) if a.untrained else demo_learner()
    if a.workers is not None: learn.dls.valid.fake_l.num_workers = a.workers # what `test_dl` inherits (`dl.num_workers` is a worker's own count)
    files = make_files(tmp, max(a.n, a.cli_n, a.report_n))
    cases = {} # group -> [(name, fn)]; the first of each group is its baseline
    notes = {}
    if 'heatmap' in a.only:
        fs = files[:a.n]
        def get_preds(): learn.get_preds(dl=learn.dls.test_dl(fs))
        cases['heatmap'] = [(f"learn.get_preds, {len(fs)} files (baseline)", get_preds),
                            (f"learn.heatmap, gradcam, {len(fs)} files", lambda: learn.heatmap(fs)),
                            # the default layer for 64-px images is '0.6' (4×4 maps): its gradient goes back through the body's last block,
                            # about a quarter of the forward's work; at the body's output ('0', 2×2 maps) only through the head
                            (f"learn.heatmap, gradcam at layer '0' (the body), {len(fs)} files", lambda: learn.heatmap(fs, layer='0'))]
        if a.workers: cases['heatmap'].append((f"gradcam, {len(fs)} files loaded in-process (num_workers=0)", lambda: explain_dl(learn, learn.dls.test_dl(fs, num_workers=0))))
        # CAM needs global average pooling → Linear after the layer (fastai's head is not one): the demo's body with such a head
        torch.manual_seed(0)
        cam = Learner(learn.dls, nn.Sequential(learn.model[0], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, len(learn.dls.vocab)))),
                      loss_func=learn.loss_func)
        def get_preds_cam(): cam.get_preds(dl=cam.dls.test_dl(fs))
        cases['cam'] = [(f"get_preds, body + GAP→Linear head, {len(fs)} files (baseline)", get_preds_cam),
                        (f"heatmap, cam, the same learner, {len(fs)} files", lambda: cam.heatmap(fs, method='cam'))]
    if 'explain' in a.only:
        pkl = tmp/'model.pkl'
        learn.export(pkl)
        folder = folder_of(files[:a.cli_n], tmp/'cli_in')
        out = tmp/'cli_out'
        def cli():
            shutil.rmtree(out, ignore_errors=True)
            run_proc(['-m', 'fastai_heatmap.cli', 'explain', str(pkl), str(folder), '--out', str(out)])
        cases['explain'] = [(f"python: load_learner + get_preds, {a.cli_n} files (baseline)", lambda: run_proc(['-c', GET_PREDS, str(pkl), str(folder)])),
                            (f"fastai-heatmap explain, {a.cli_n} files, every PNG written", cli)]
    if 'report' in a.only:
        fs = files[:a.report_n]
        dl = learn.dls.test_dl(fs, with_labels=True)
        faith_n, steps, methods = 16, 16, ['gradcam', 'gradcam++', 'saliency'] # model_report's defaults
        sample = [fs[i] for i in sorted(torch.randperm(len(fs), generator=torch.Generator().manual_seed(0))[:faith_n].tolist())]
        size = tuple(learn.heatmap(sample[:1]).shape[-2:])
        def faith():
            for m in methods + ['random']:
                maps = torch.rand(len(sample), *size) if m == 'random' else learn.explain(sample, method=m, bar=False).maps
                for metric in ('deletion', 'insertion'): heatmap_faithfulness(learn, sample, maps=maps, metric=metric, steps=steps)
        times_faith = []
        def baseline():
            learn.get_preds(dl=dl)
            times_faith.append(timed(faith))
        stages = {}
        def report():
            r = model_report(learn, dl, tmp/'report.html', bar=False)
            for k, v in r.run['stages'].items(): stages.setdefault(k, []).append(v)
        cases['report'] = [(f"get_preds, {len(fs)} images + faithfulness sample alone (baseline)", baseline),
                           (f"model_report, {len(fs)} images (every section)", report)]
        notes['report'] = (times_faith, stages)
    flat = [(g, n, f) for g, cs in cases.items() for n, f in cs]
    times = {n: [] for _, n, _ in flat}
    t_start = time.perf_counter()
    with learn.no_bar(), (cam.no_bar() if 'heatmap' in a.only else contextlib.nullcontext()):
        for _, n, f in flat: timed(f) # warm-up
        if 'report' in notes: notes['report'][0].clear(); notes['report'][1].clear()
        for r in range(a.repeats):
            for j in range(len(flat)):
                _, n, f = flat[(r + j) % len(flat)]
                times[n].append(timed(f))
                print(f"round {r+1}: {n}: {times[n][-1]:.2f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t_start
    load1 = os.getloadavg()
    goals = {'heatmap': 1.1, 'cam': 1.1, 'explain': 1.3, 'report': 2.0}
    print(f"fastai_heatmap {fastai_heatmap.__version__}, fastai {fastai.__version__}, torch {torch.__version__}; {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {next(learn.model.parameters()).device}")
    print(f"{'untrained resnet18 of the demo' if a.untrained else 'demo learner'} (resnet18 from random weights, 64×64 digits), DataLoader workers {learn.dls.valid.fake_l.num_workers}; {a.repeats} rounds after a warm-up, interleaved; {wall:.0f} s in all")
    print(f"load average (1, 5, 15 min) at the start {', '.join(f'{v:.2f}' for v in load0)}, at the end {', '.join(f'{v:.2f}' for v in load1)} "
          f"(on a shared machine other processes run meanwhile)")
    print(f"{'':70s} {'median s':>9s} {'× base':>7s} {'(med. of ratios)':>16s} {'goal':>5s}")
    for g, cs in cases.items():
        base = times[cs[0][0]]
        for i, (n, _) in enumerate(cs):
            m = statistics.median(times[n])
            ratio = m / statistics.median(base)
            per = statistics.median(t / b for t, b in zip(times[n], base))
            ok = '' if i == 0 else ('ok' if ratio <= goals[g] else 'MISS')
            print(f"{n:70s} {m:9.2f} {ratio:7.2f} {per:16.2f} {'' if i == 0 else f'≤{goals[g]}':>5s} {ok}")
        if g == 'report':
            tf, st = notes['report']
            print(f"   of the baseline, the faithfulness sample alone: {statistics.median(tf):.2f} s; the report's stages (median s): "
                  + ', '.join(f"{k} {statistics.median(v):.2f}" for k, v in st.items()))
    if not a.keep: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__': main()
