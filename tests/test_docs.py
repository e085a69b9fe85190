"""The built docs site (`bash docs/build.sh`), as a browser renders it: headless Chromium (Debian's `chromium` and
`chromium-driver`) on a local server. Skipped when the site is not built or Chromium is missing, unless
DOCS_REQUIRE_BROWSER=1 (docs/check.sh sets it): then those are failures."""
import os, sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'docs'))
from browser import SITE, chromium, have_browser, serve, wait_loaded  # noqa: E402

REQUIRED = os.environ.get('DOCS_REQUIRE_BROWSER') == '1'


def _need(ok, why):
    if ok: return
    if REQUIRED: pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope='module')
def browser():
    _need((SITE/'index.html').exists(), 'the docs site is not built (bash docs/build.sh)')
    _need(have_browser(), 'no chromium/chromedriver (apt-get install -y chromium chromium-driver)')
    pytest.importorskip('selenium')
    with serve(SITE) as base, chromium() as drv: yield base, drv


def nav_pages():
    "The pages of the navigation, in order, as docs/nb2md.py wrote them from nbs/sidebar.yml"
    import yaml
    conf = yaml.safe_load((ROOT/'_mkdocs'/'mkdocs.yml').read_text())
    def flat(items):
        for it in items:
            if isinstance(it, str): yield it
            elif isinstance(it, dict):
                for v in it.values(): yield from (flat(v) if isinstance(v, list) else [v])
    return [p.replace('.md', '.html') for p in flat(conf['nav'])]


def open_page(browser, page):
    base, drv = browser
    drv.get(base + page)
    wait_loaded(drv)
    return drv


def check_common(browser, page):
    "Styled, nothing from the internet, every image loaded"
    base, drv = browser
    drv = open_page(browser, page)
    # the theme's style sheet applied (an unstyled page has a static, transparent header)
    assert drv.execute_script("return getComputedStyle(document.querySelector('.md-header')).position") == 'sticky'
    # everything it loaded came from the local server
    urls = drv.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in urls if not u.startswith(base) and not u.startswith(('data:', 'blob:'))]
    assert not outside, f'{page} loaded from outside the site: {outside}'
    imgs = drv.execute_script("return Array.from(document.querySelectorAll('article img'))"
                              ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
    broken = [src for src, done, w in imgs if not (done and w > 0)]
    assert not broken, f'{page}: images not loaded: {broken}'
    return drv, imgs


def test_home(browser):
    drv, imgs = check_common(browser, 'index.html')
    assert len(imgs) >= 1, 'the home page shows no figure'
    # the sidebar: every page, in nbs/sidebar.yml's order
    links = drv.execute_script(
        "return Array.from(document.querySelectorAll('.md-sidebar--primary .md-nav__link[href]'))"
        ".map(a => [a.getAttribute('href'), a.textContent.trim()])")
    hrefs = [urlsplit(h).path.split('/')[-1] or 'index.html' for h, _ in links if '#' not in h]
    hrefs = [h if h != '.' else 'index.html' for h in hrefs]
    want = nav_pages()
    assert [h for h in hrefs if h in want] == want, f'sidebar {hrefs} != {want}'
    texts = dict((urlsplit(h).path.split('/')[-1], t) for h, t in links)
    assert texts.get('interpret.html') == 'Interpretation with heatmaps'
    # syntax highlighting: the code has Pygments' token spans
    assert drv.execute_script("return document.querySelectorAll('.highlight code span.kn, .highlight code span.k').length") > 0


def test_interpret(browser):
    drv, _ = check_common(browser, 'interpret.html')
    assert drv.title.startswith('Interpretation with heatmaps')
    # the API entries, at the Quarto site's anchors, with their docments tables
    for ident, name, params in [('heatmapinterpretation.plot_top_losses', 'HeatmapInterpretation.plot_top_losses', ['k', 'largest']),
                                ('heatmapinterpretation', 'HeatmapInterpretation', ['learn']),
                                ('heatmapinterpretation.plot_class_heatmaps', 'HeatmapInterpretation.plot_class_heatmaps', ['alpha', 'nrows'])]:
        entry = drv.execute_script(
            "const h = document.getElementById(arguments[0]); if (!h) return null;"
            "const d = h.closest('.doc-entry'); const t = d && d.querySelector('table');"
            "return {heading: h.textContent, visible: h.getBoundingClientRect().height > 0,"
            " params: t ? Array.from(t.querySelectorAll('tbody tr td:first-child')).map(td => td.textContent.trim()) : [],"
            " sig: d ? d.querySelector('.highlight').textContent : ''}", ident)
        assert entry, f'no API entry #{ident} on interpret.html'
        assert name in entry['heading'] and entry['visible']
        assert all(p in entry['params'] for p in params), (ident, entry['params'])
        assert entry['sig'].strip().startswith(name.split('.')[-1] + '(')
    # no raw progress bars left in the page's text
    text = drv.execute_script("return document.querySelector('article').innerText")
    assert '█' not in text and '[0/' not in text


def test_search(browser):
    "The search index is served by the site itself and finds an API entry"
    base, drv = browser
    drv.get(base + 'index.html?q=border_mass')
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(drv, 15).until(lambda d: d.execute_script(
        "return document.querySelectorAll('.md-search-result__item').length > 0"))
    hits = drv.execute_script("return Array.from(document.querySelectorAll('.md-search-result__link')).map(a => a.getAttribute('href'))")
    assert any('metrics.html' in h and h.endswith('#border_mass') for h in hits), hits
