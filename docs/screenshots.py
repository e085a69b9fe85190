"""Screenshots (PNG) of a few pages of the built site, rendered by headless Chromium from a local server: to look at
before a docs change is done (unstyled pages, broken figures, unreadable API tables, raw progress bars...).

    python docs/screenshots.py [--out _screenshots] [page.html[#anchor] ...]

By default: the top of the home page and of the interpret page, the first figure of the home page, an API entry,
a search for `heatmap`, and the interpret page at a phone's width."""
import argparse, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import SITE, chromium, serve, wait_loaded  # noqa: E402

DEFAULT = ['index.html', 'index.html#figure', 'interpret.html', 'interpret.html#heatmapinterpretation.plot_top_losses',
           'core.html#heatmap', 'search:heatmap', 'mobile:interpret.html']


def shoot(drv, base, spec, out):
    name = spec.replace(':', '-').replace('#', '--').replace('.html', '').replace('/', '_') + '.png'
    if spec.startswith('mobile:'):
        drv.set_window_size(414, 900); spec = spec[len('mobile:'):]
    else: drv.set_window_size(1280, 900)
    if spec.startswith('search:'):
        drv.get(base + 'index.html?q=' + spec[len('search:'):]); wait_loaded(drv); time.sleep(1.5)
    else:
        page, _, anchor = spec.partition('#')
        drv.get(base + page); wait_loaded(drv)
        if anchor == 'figure':
            drv.execute_script("const f = document.querySelector('article img'); if (f) f.scrollIntoView({block: 'center'});")
        elif anchor:
            drv.execute_script("const e = document.getElementById(arguments[0]); if (e) e.scrollIntoView();", anchor)
        time.sleep(0.3)
    p = Path(out)/name
    drv.save_screenshot(str(p))
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('pages', nargs='*', default=DEFAULT)
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent.parent/'_screenshots'))
    ap.add_argument('--site', default=str(SITE))
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with serve(a.site) as base, chromium() as drv:
        for spec in a.pages: print(shoot(drv, base, spec, a.out))


if __name__ == '__main__': main()
