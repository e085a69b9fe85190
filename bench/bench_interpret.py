"""Cost of the heatmaps in `plot_top_losses`: fastai_heatmap's `HeatmapInterpretation.plot_top_losses(k)` against
fastai's own `ClassificationInterpretation.plot_top_losses(k)` on the same learner, measured side by side in one run.

Run it from the repository root (it uses the demo learner, trained once and cached; the first run trains it):

    python bench/bench_interpret.py            # k=9, 15 repeats
    python bench/bench_interpret.py --k 16 --repeats 25 --draw

Each call builds the whole figure (re-predicting the k items, computing the heatmaps, drawing the axes); with `--draw` the
figure is also rendered (`fig.canvas.draw()`), as a notebook does when it shows it. The calls are interleaved round-robin
so that they share the machine's conditions; each time is the median over the repeats after one warm-up call.
"""
import argparse, statistics, time, warnings
from pathlib import Path
import sys
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

warnings.filterwarnings('ignore')
try: import fastai_heatmap  # noqa: F401
except ImportError: sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastai.vision.all import ClassificationInterpretation
from fastai_heatmap.all import HeatmapInterpretation, demo_learner


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--k', type=int, default=9)
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--draw', action='store_true', help='also render each figure')
    args = p.parse_args()
    learn = demo_learner()
    fa = ClassificationInterpretation.from_learner(learn)
    ours = HeatmapInterpretation.from_learner(learn)
    k = args.k

    def fastai_plot(): fa.plot_top_losses(k); return plt.gcf()
    cases = {
        "fastai ClassificationInterpretation.plot_top_losses (baseline)": fastai_plot,
        "HeatmapInterpretation.plot_top_losses, gradcam, layer '0.6'": lambda: ours.plot_top_losses(k, layer='0.6'),
        "HeatmapInterpretation.plot_top_losses, gradcam, body (default layer)": lambda: ours.plot_top_losses(k),
        "HeatmapInterpretation.plot_top_losses, heatmap=False (fastai's plot)": lambda: ours.plot_top_losses(k, heatmap=False),
        "HeatmapInterpretation.plot_top_losses, target='both', layer '0.6'": lambda: ours.plot_top_losses(k, target='both', layer='0.6'),
    }
    times = {n: [] for n in cases}
    def run(f):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            fig = f()
            if args.draw: fig.canvas.draw()
        dt = time.perf_counter() - t
        plt.close('all')
        return dt
    names = list(cases)
    with learn.no_bar():  # fastai's progress bars print text outside a notebook; both sides without them
        for f in cases.values(): run(f)  # warm-up
        for r in range(args.repeats):
            for j in range(len(names)):
                n = names[(r + j) % len(names)]
                times[n].append(run(cases[n]))
    base = statistics.median(times[names[0]])
    print(f"plot_top_losses({k}) on the demo learner (resnet18, 64×64 images, CPU), median of {args.repeats}"
          + (", figure rendered" if args.draw else ", figure built, not rendered"))
    print(f"{'':74s} {'ms':>8s} {'× fastai':>9s}")
    for n in names:
        m = statistics.median(times[n])
        print(f"{n:74s} {m*1000:8.1f} {m/base:9.2f}")


if __name__ == '__main__': main()
