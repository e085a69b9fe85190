"""Checks the built site offline: every internal link, anchor and image resolves, and no page loads anything (script,
style sheet, font, image, frame) from the internet. Also checks that README.md's images are files in the repository.

    python docs/check_site.py [_site] [--readme README.md]

Exits 1 and lists the problems if there are any. Standard library only."""
import argparse, re, sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

LOADS = {('script', 'src'), ('img', 'src'), ('iframe', 'src'), ('source', 'src'), ('video', 'src'), ('audio', 'src'),
         ('embed', 'src'), ('object', 'data'), ('input', 'src'), ('track', 'src'), ('video', 'poster')}
LINK_LOADS = {'stylesheet', 'icon', 'preload', 'modulepreload', 'prefetch', 'manifest', 'apple-touch-icon'}


class Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids, self.links, self.loads = set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ('id', 'name') if tag in ('a', 'map') else ('id',):
            if a.get(k): self.ids.add(a[k])
        if tag == 'a' and a.get('href') is not None: self.links.append(a['href'])
        if tag == 'link' and a.get('href'):
            rel = set((a.get('rel') or '').lower().split())
            (self.loads if rel & LINK_LOADS else self.links).append(a['href'])
        for t, k in LOADS:
            if tag == t and a.get(k): self.loads.append(a[k])
        if a.get('srcset'): self.loads += [s.strip().split()[0] for s in a['srcset'].split(',') if s.strip()]
        if a.get('style') and 'url(' in a['style']: self.loads += re.findall(r'url\(["\']?([^"\')]+)', a['style'])

    def handle_startendtag(self, tag, attrs): self.handle_starttag(tag, attrs)


def external(u): return bool(re.match(r'^(https?:)?//', u, re.I))
def skip(u): return not u or u.startswith(('mailto:', 'javascript:', 'data:', 'tel:')) or re.match(r'^[a-z][\w+.-]*:', u, re.I) and not external(u)


def check_site(site):
    site = Path(site).resolve()
    pages, problems = {}, []
    htmls = [p for p in site.rglob('*.html') if 'search' not in p.relative_to(site).parts[:1]]
    if not htmls: return [f'{site}: no HTML pages (build the site first: bash docs/build.sh)']
    # where the site is served (its URL's path, from the home page's canonical link): for root-relative URLs
    canon = re.search(r'<link rel="canonical" href="([^"]+)"', (site/'index.html').read_text()) if (site/'index.html').exists() else None
    base = urlsplit(canon.group(1)).path.rsplit('/', 1)[0] + '/' if canon else '/'
    def resolve(p, path):
        if path.startswith('/'):
            if not path.startswith(base): return site/'__outside_the_site__'
            return (site/path[len(base):]).resolve()
        return (p.parent/path).resolve()
    for p in htmls:
        pg = Page(); pg.feed(p.read_text(errors='replace')); pages[p] = pg
    def ids_of(p):
        if p not in pages:
            pg = Page(); pg.feed(p.read_text(errors='replace')); pages[p] = pg
        return pages[p].ids
    for p, pg in sorted(pages.items()):
        rel = p.relative_to(site)
        for u in pg.loads:
            if external(u): problems.append(f'{rel}: loads {u} from the internet')
            elif not skip(u):
                t = resolve(p, unquote(urlsplit(u).path))
                if not t.is_file(): problems.append(f'{rel}: missing file {u}')
        for u in pg.links:
            if skip(u) or external(u): continue
            parts = urlsplit(u)
            path, frag = unquote(parts.path), unquote(parts.fragment)
            t = resolve(p, path) if path else p
            if path.endswith('/') or t.is_dir(): t = t/'index.html'
            if not t.exists(): problems.append(f'{rel}: broken link {u}'); continue
            if frag and t.suffix == '.html' and frag not in ids_of(t):
                problems.append(f'{rel}: link {u}: no anchor #{frag} in {t.relative_to(site)}')
    for css in site.rglob('*.css'):
        for u in re.findall(r'(?:url\(\s*["\']?|@import\s+["\'])((?:https?:)?//[^"\')\s]+)', css.read_text(errors='replace')):
            problems.append(f'{css.relative_to(site)}: loads {u} from the internet')
    return problems


def check_readme(readme):
    readme, problems = Path(readme), []
    text = re.sub(r'(?ms)^(`{3,}).*?^\1', '', readme.read_text())          # not inside code blocks
    for u in re.findall(r'!\[[^\]]*\]\(\s*<?([^)\s>]+)', text) + re.findall(r'<img[^>]+src="([^"]+)"', text):
        if external(u): problems.append(f'{readme.name}: image {u} is not a file of the repository')
        elif not (readme.parent/unquote(u)).is_file(): problems.append(f'{readme.name}: missing image {u}')
    for u in re.findall(r'(?<!!)\[[^\]]*\]\(\s*<?([^)\s>#]+)', text):
        if not skip(u) and not external(u) and not (readme.parent/unquote(u)).exists():
            problems.append(f'{readme.name}: broken link {u}')
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('site', nargs='?', default=str(Path(__file__).resolve().parent.parent/'_site'))
    ap.add_argument('--readme', default=None)
    a = ap.parse_args()
    problems = check_site(a.site) + (check_readme(a.readme) if a.readme else [])
    for p in problems: print(p)
    n = len(list(Path(a.site).rglob('*.html')))
    print(f'{len(problems)} problems in {n} pages' + (f' and {a.readme}' if a.readme else ''))
    sys.exit(1 if problems else 0)


if __name__ == '__main__': main()
