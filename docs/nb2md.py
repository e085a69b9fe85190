"""Turn the notebooks that `nbdev-proc-nbs` processed (in `_proc/`) into the Markdown pages of the docs site, and
`nbs/index.ipynb` into README.md: what Quarto does in `nbdev-docs` / `nbdev-readme`, for machines without Quarto.

    python docs/nb2md.py            # _proc/*.ipynb -> _mkdocs/docs/*.md (+ figures), _mkdocs/mkdocs.yml, README.md

Pages keep the Quarto site's URLs (`02_core.ipynb` -> `core.html`, from nbdev's `output-file`), the navigation is
`nbs/sidebar.yml`'s, and the page options Quarto honours are honoured here: `#| echo: false` (no code),
`#| output: false` (no outputs), `#| include: false` / `#| hide` (no cell), `#| output: asis` (the output is Markdown,
as `show_doc`'s), `#| code-fold`, `#| fig-cap` / `#| fig-alt`. Figures are written as PNG files next to their page;
progress bars (fastprogress) and stderr are dropped. Uses the standard library, PyYAML and nbdev only."""
import argparse, ast, base64, html, io, json, re, shutil, sys, tokenize
from pathlib import Path

import yaml
from nbdev.config import get_config, nbpath2html
from nbdev.doclinks import NbdevLookup

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------- small helpers
_re_ansi = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
# fastprogress's text bar, as it prints outside Jupyter: `|████----| 33.33% [1/3 00:00<00:01 loss]`
_re_bar = re.compile(r'█?\s*\|[█ -]*\|\s*\d+(?:\.\d+)?%\s*\[\d+/\d+[^\]\n]*\][ \t]*')
_re_fence = re.compile(r'^\s*(`{3,}|~{3,})')
_re_heading = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_re_mdlink = re.compile(r'(!?\[(?:[^\[\]]|\[[^\]]*\])*\])\(\s*<?([^)\s>]+)>?(\s+"[^"]*")?\s*\)')
_re_backticks = re.compile(r'`[^`]*`')
_skip_plain = re.compile(r'^<(Figure size|IPython\.core\.display\.\w+ object|matplotlib\.\w+.*)>$')


def pandoc_id(text, seen):
    "The id pandoc (so Quarto) gives a heading: what the Quarto site's anchors are, e.g. `#heatmapinterpretation.show`"
    t = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)          # links -> their text
    t = re.sub(r'<[^>]+>', '', t)                               # html tags
    t = re.sub(r'[`*]', '', t).lower()
    t = re.sub(r'[^\w\s.\-]', '', t)
    t = re.sub(r'\s+', '-', t.strip())
    t = re.sub(r'^[^a-z]+', '', t) or 'section'
    base, n = t, 0
    while t in seen: n += 1; t = f'{base}-{n}'
    seen.add(t)
    return t


def directives(src):
    "Leading `#| key: value` lines of a cell -> (dict, source without them)"
    d, lines = {}, src.splitlines()
    i = 0
    while i < len(lines) and (lines[i].startswith('#|') or not lines[i].strip()):
        l = lines[i][2:].strip()
        if lines[i].startswith('#|') and l:
            k, _, v = l.partition(':')
            v = v.strip()
            try: v = yaml.safe_load(v) if v else True
            except yaml.YAMLError: pass
            d[k.strip()] = v
        i += 1
    return d, '\n'.join(lines[i:]).strip('\n')


def plain(md):
    "Markdown -> text (for the page's meta description)"
    if not md: return md
    t = re.sub(r'!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)', r'\1', str(md))
    return re.sub(r'[`*_]', '', t)


def falsy(v): return v is False or str(v).lower() in ('false', 'no', '0')


def src_of(x): return ''.join(x) if isinstance(x, list) else (x or '')


def fence(text, lang=''):
    "A fenced block that the text's own backticks cannot close"
    n = max([3] + [len(m) + 1 for m in re.findall(r'`{3,}', text)])
    return f"{'`' * n}{lang}\n{text}\n{'`' * n}"


def clean_stream(text):
    "Terminal text as it would read: ANSI codes, carriage-return overwrites and progress bars removed"
    text = _re_ansi.sub('', text)
    lines = [l.rsplit('\r', 1)[-1] if '\r' in l.rstrip('\r') else l.rstrip('\r') for l in text.split('\n')]
    lines = [_re_bar.sub('', l).rstrip() for l in lines]
    lines = [l for l in lines if l.strip(' █')]
    return '\n'.join(lines).strip('\n')


def png_width(data, ref_dpi=100):
    """Display width (CSS px) of a PNG saved at a high dpi (matplotlib writes it in the pHYs chunk): one figure inch
    is `ref_dpi` px, as in Jupyter, instead of a 3-inch figure at 200 dpi drawn 600 px wide. None if nothing to do."""
    import struct
    if data[:8] != b'\x89PNG\r\n\x1a\n': return None
    w, i, dpi = struct.unpack('>I', data[16:20])[0], 8, None
    while i + 8 <= len(data):
        n, typ = struct.unpack('>I4s', data[i:i + 8])
        if typ == b'pHYs':
            ppx, _, unit = struct.unpack('>IIB', data[i + 8:i + 17])
            if unit == 1: dpi = ppx * 0.0254
            break
        if typ == b'IDAT': break
        i += 12 + n
    return round(w * ref_dpi / dpi) if dpi and dpi > ref_dpi * 1.05 else None


def is_progress_html(h):
    return '<progress' in h or 'progress-bar' in h or 'fastprogress' in h


# ---------------------------------------------------------------------------------------------------- the site
class Site:
    "Names, URLs and link rewriting shared by all pages"
    def __init__(self, proc, nbs, out, readme):
        self.cfg = get_config()
        self.proc, self.nbs, self.out, self.readme = Path(proc), Path(nbs), Path(out), Path(readme)
        self.docs = self.out/'docs'
        self.url = (self.cfg.doc_host.rstrip('/') + '/' + self.cfg.doc_baseurl.strip('/')).rstrip('/') + '/'
        self.nb_files = sorted(p.relative_to(self.nbs) for p in self.nbs.rglob('*.ipynb')
                               if not any(q.startswith(('.', '_')) for q in p.relative_to(self.nbs).parts))
        self.pages = {}                                     # notebook (relative to nbs) -> page .md (relative to docs)
        for nb in self.nb_files:
            fm = self.frontmatter(self.proc_nb(nb))
            html_name = fm.get('output-file') or nbpath2html(nb).name
            self.pages[nb] = (nb.parent/html_name).with_suffix('.md')
        self.by_html = {p.with_suffix('.html').as_posix(): p for p in self.pages.values()}
        self.by_nb = {nb.as_posix(): p for nb, p in self.pages.items()}
        self.anchors, self.unlinked = None, set()   # page -> its heading ids, once known; links dropped
        try: self.lookup = NbdevLookup()
        except Exception: self.lookup = None

    def proc_nb(self, nb):
        p = self.proc/nb
        if not p.exists(): sys.exit(f"{p} is missing: run nbdev-proc-nbs first (docs/build.sh does).")
        return json.loads(p.read_text())

    @staticmethod
    def frontmatter(nb):
        for c in nb['cells'][:3]:
            s = src_of(c['source']).strip()
            if c['cell_type'] == 'raw' and s.startswith('---'):
                try: return yaml.safe_load(s.strip('-\n')) or {}
                except yaml.YAMLError: return {}
        return {}

    def rewrite_url(self, url, page, readme, label=''):
        """A link as the notebook author wrote it (Quarto page, notebook, or absolute docs URL) -> the site's or README's.
        None for one of nbdev's automatic links to a symbol that has no `show_doc` entry (no anchor to land on)."""
        auto = False
        if url.startswith(self.url):
            url, auto = url[len(self.url):] or 'index.html', bool(re.fullmatch(r'\[`[^`]+`\]', label))
        elif re.match(r'^[a-z][a-z0-9+.-]*:|^#|^/', url): return url
        path, hash_, anchor = url.partition('#')
        base = page.parent
        rel = (base/path).as_posix() if path else None
        target = None
        if rel is not None:
            rel = str(Path(rel)).replace('\\', '/')
            target = self.by_html.get(rel) or self.by_nb.get(rel) or (Path(rel) if rel in map(str, self.pages.values()) else None)
        if target is None: return url
        if auto and anchor and self.anchors is not None and anchor not in self.anchors.get(target, ()):
            self.unlinked.add((page.as_posix(), label[2:-2], f'{target.with_suffix(".html")}#{anchor}'))
            return None
        if readme: return self.url + target.with_suffix('.html').as_posix() + hash_ + anchor
        return _relpath(target, page.parent) + hash_ + anchor

    def linkify(self, md):
        "nbdev's doc links for `symbol`s (as nbdev's own Quarto build adds), skipping text that already is a link"
        if not self.lookup or not md: return md
        try: return self.lookup.linkify(md)
        except Exception: return md


def _relpath(target, start):
    import os
    return Path(os.path.relpath(target, start)).as_posix()


# ---------------------------------------------------------------------------------------------------- API entries
_re_showdoc = re.compile(r'^\s*(?:---\s*\n)?\s*(?:\[source\]\(([^)\s]*)\)(?:\{[^}\n]*\})?\s*\n)?\s*'
                         r'(#{2,6}) +(\S[^\n]*)\n+(`{3,})python\n(.*?)\n\4\s*\n?(.*)$', re.S)


def _comments(code):
    "line number -> the comment on that line"
    out = {}
    try:
        for t in tokenize.generate_tokens(io.StringIO(code).readline):
            if t.type == tokenize.COMMENT: out[t.start[0]] = t.string.lstrip('#').strip()
    except (tokenize.TokenError, IndentationError, SyntaxError): pass
    return out


def parse_signature(code):
    "nbdev 3's signature block (`def f(\\n    a:int=1, # docment\\n):`) -> (name, params, returns); None if unparsable"
    lines = code.rstrip().split('\n')
    last, hash_, comment = lines[-1].partition('#')
    if not last.rstrip().endswith(':'): lines[-1] = last.rstrip() + ':' + (' #' + comment if hash_ else '')
    body = '\n'.join(lines)
    try: tree = ast.parse(body + '\n    pass')
    except SyntaxError: return None
    fn = tree.body[0] if tree.body else None
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)): return None
    cm, a = _comments(body), fn.args
    params = []   # (display name, annotation, default, line)
    pos = a.posonlyargs + a.args
    defs = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    for p, d in zip(pos, defs): params.append((p.arg, p.annotation, d, p.lineno))
    if a.vararg: params.append(('*' + a.vararg.arg, a.vararg.annotation, None, a.vararg.lineno))
    for p, d in zip(a.kwonlyargs, a.kw_defaults): params.append((p.arg, p.annotation, d, p.lineno))
    if a.kwarg: params.append(('**' + a.kwarg.arg, a.kwarg.annotation, None, a.kwarg.lineno))
    un = lambda n: ast.unparse(n) if n is not None else ''
    rows = []
    last_on_line = {line: i for i, (_, _, _, line) in enumerate(params)}
    for i, (name, ann, d, line) in enumerate(params):
        # fastcore's docments: a comment documents the parameter it follows, the last one on its line
        typ, dflt = un(ann), un(d)
        if typ == 'NoneType' and dflt == 'None': typ = ''      # nbdev's type for an unannotated `x=None`
        rows.append(dict(name=name, type=typ, default=dflt, doc=cm.get(line, '') if last_on_line[line] == i else '',
                         line=line, kwonly=bool(a.kwonlyargs) and name in [k.arg for k in a.kwonlyargs]))
    close = len(body.rstrip().split('\n'))                    # the `)->T:` line, where fastcore puts the return's docment
    close_doc = cm.get(close, '') if close not in {r['line'] for r in rows} else ''
    if close_doc and rows and rows[-1]['name'].startswith('*') and not rows[-1]['doc']:
        # fastcore's docments gives `**kwargs, # doc` to the return (kwargs are left out by default): give it back
        rows[-1]['doc'], close_doc = close_doc, ''
    returns = dict(type=un(fn.returns), doc=close_doc) if fn.returns is not None or close_doc else None
    return fn.name, rows, returns


def short_signature(name, rows, width=76):
    "`name(a, b=1, *, c=None, **kwargs)`, wrapped like black would"
    parts, star = [], False
    for r in rows:
        if r['kwonly'] and not star and not any(p.startswith('*') and not p.startswith('**') for p in parts):
            parts.append('*'); star = True
        parts.append(r['name'] + (f"={r['default']}" if r['default'] else ''))
    one = f"{name}({', '.join(parts)})"
    if len(one) <= width: return one
    lines, cur = [], '    '
    for p in parts:
        piece = p + ', '
        if len(cur) + len(piece) > width and cur.strip(): lines.append(cur.rstrip()); cur = '    '
        cur += piece
    lines.append(cur.rstrip().rstrip(','))
    return f"{name}(\n" + '\n'.join(lines) + '\n)'


def _mdcode(s):
    "`s` as inline code (in a table cell)"
    if not s: return ''
    n = max([0] + [len(m) for m in re.findall(r'`+', s)]) + 1
    pad = ' ' if s.startswith('`') or s.endswith('`') else ''
    return f"{'`' * n}{pad}{s}{pad}{'`' * n}"


def _cell(t):
    "Markdown for a table cell: `|` escaped outside code spans, one line"
    if not t: return ''
    t = ' '.join(t.split('\n'))
    parts, last = [], 0
    for m in _re_backticks.finditer(t):
        parts += [t[last:m.start()].replace('|', '\\|'), m.group(0)]; last = m.end()
    parts.append(t[last:].replace('|', '\\|'))
    return ''.join(parts)


def api_entry(md, fix, seen, readme=False):
    "`show_doc`'s Markdown -> an API entry: heading (with the Quarto anchor), signature, docstring, parameter table"
    m = _re_showdoc.match(md)
    sig = parse_signature(m.group(5)) if m else None
    if sig is None: return None
    source, level, title, _, code, rest = m.groups()
    name, rows, returns = sig
    rest = fix(rest.strip(), False)
    if readme:
        src = f'[source]({source})\n\n' if source else ''
        return f"{src}{level} {title}\n\n{fence(short_signature(name, rows), 'python')}\n\n{rest}".rstrip()
    ident = pandoc_id(title, seen)
    label = title if len(title) <= 26 or '.' not in title else '.' + title.rsplit('.', 1)[1]   # the TOC's width
    src = (f'<div class="doc-source"><a href="{html.escape(source)}" title="The source code, on GitHub">source</a></div>'
           if source else '')
    out = [f'<div class="doc-entry" markdown>', src, '',
           f'{level} {title} {{ #{ident} .doc-heading data-toc-label="{html.escape(label)}" }}', '',
           fence(short_signature(name, rows), 'python'), '']
    if rest: out += [rest, '']
    if rows or (returns and (returns['type'] or returns['doc'])):
        # a pipe table (Python-Markdown keeps `|` inside code spans): styled as the site's tables, links resolved
        out += ['<div class="doc-params" markdown>', '', '| Parameter | Type | Default | Details |', '|---|---|---|---|']
        for r in rows:
            out.append(f"| {_mdcode(r['name'])} | {_mdcode(r['type'])} | {_mdcode(r['default'])} | {_cell(fix(r['doc'], True))} |")
        if returns and (returns['type'] or returns['doc']):
            out.append(f"| **Returns** | {_mdcode(returns['type'])} | | {_cell(fix(returns['doc'], True))} |")
        out += ['', '</div>', '']
    out.append('</div>')
    return '\n'.join(out)


# ---------------------------------------------------------------------------------------------------- Markdown
def convert_callouts(md):
    "Quarto's `::: {.callout-note}` blocks -> admonitions; other `:::` divs keep their content"
    lines, out, stack = md.split('\n'), [], []
    for l in lines:
        m = re.match(r'^\s*(:{3,})\s*(\{[^}]*\}|[\w-]+)?\s*$', l)
        if m and m.group(2):
            kind = re.search(r'\.callout-(\w+)', m.group(2))
            title = re.search(r'title="([^"]*)"', m.group(2))
            if kind:
                k = {'important': 'danger', 'caution': 'warning'}.get(kind.group(1), kind.group(1))
                out.append(f'<div class="admonition {k}" markdown>')
                out.append(f'<p class="admonition-title">{html.escape(title.group(1) if title else kind.group(1).title())}</p>')
                out.append('')
                stack.append('callout')
            else: stack.append('div')
            continue
        if m and stack:
            if stack.pop() == 'callout': out += ['', '</div>']
            continue
        out.append(l)
    return '\n'.join(out)


def rewrite_links(line, fix):
    "Replace each Markdown link of a line (not what is inside inline code) by `fix(label, url, title)`"
    masked = _re_backticks.sub(lambda m: '`' + 'x' * (len(m.group(0)) - 2) + '`', line)
    out, last = [], 0
    for m in _re_mdlink.finditer(masked):
        label = line[m.start(1):m.end(1)]
        url = line[m.start(2):m.end(2)]
        ttl = line[m.start(3):m.end(3)] if m.group(3) else ''
        out += [line[last:m.start()], fix(label, url, ttl)]
        last = m.end()
    out.append(line[last:])
    return ''.join(out)


def rewrite_markdown(md, site, page, seen, readme, assets):
    "Links, images and heading anchors of a Markdown cell"
    out, in_fence, fence_mark = [], False, ''
    for l in md.split('\n'):
        fm = _re_fence.match(l)
        if fm:
            if not in_fence: in_fence, fence_mark = True, fm.group(1)
            elif fm.group(1).startswith(fence_mark) and l.strip() == fm.group(1): in_fence = False
            out.append(l); continue
        if in_fence or l.startswith('    '): out.append(l); continue
        def fix(label, url, ttl):
            if label.startswith('!'): return f'{label}({assets(url)}{ttl})'
            new = site.rewrite_url(url, page, readme, label)
            return label[1:-1] if new is None else f'{label}({new}{ttl})'
        l = rewrite_links(l, fix)
        hm = _re_heading.match(l)
        if hm and not readme and not hm.group(2).rstrip().endswith('}'):
            l = f'{hm.group(1)} {hm.group(2)} {{ #{pandoc_id(hm.group(2), seen)} }}'
        out.append(l)
    return '\n'.join(out)


# ---------------------------------------------------------------------------------------------------- a page
class Page:
    def __init__(self, site, nb_rel, readme=False):
        self.site, self.nb_rel, self.readme = site, nb_rel, readme
        self.nb = site.proc_nb(nb_rel)
        self.md_rel = site.pages[nb_rel]
        if readme:
            self.dest_dir, self.files_rel = site.readme.parent, Path('README_files/figure-commonmark')
            self.link_base = Path('.')
        else:
            self.dest_dir = site.docs/self.md_rel.parent
            self.files_rel = Path(self.md_rel.stem + '_files')
            self.link_base = self.md_rel.parent
        self.seen, self.files = set(), {}

    def write_file(self, name, data):
        self.files[(self.files_rel/name).as_posix()] = data
        return (self.files_rel/name).as_posix()

    def asset(self, url):
        "An image a Markdown cell links to, relative to its notebook: copied next to the page"
        if re.match(r'^[a-z][a-z0-9+.-]*:', url) or url.startswith('/'):
            return url
        src = self.site.nbs/self.nb_rel.parent/url.split('#')[0]
        if src.exists():
            rel = Path(url) if not self.readme else Path('README_files')/url
            self.files[rel.as_posix()] = src.read_bytes()
            return rel.as_posix()
        return url

    def outputs(self, cell, n, opts):
        "The cell's outputs as Markdown blocks"
        blocks, k = [], 0
        asis = str(opts.get('output', '')).lower() == 'asis'
        for o in cell.get('outputs', []):
            t = o.get('output_type')
            if t == 'stream':
                if o.get('name') == 'stderr': continue
                text = clean_stream(src_of(o.get('text')))
                if text: blocks.append(self.text_block(text))
            elif t == 'error':
                text = _re_ansi.sub('', '\n'.join(o.get('traceback', [])) or f"{o.get('ename')}: {o.get('evalue')}")
                blocks.append(self.text_block(text))
            elif t in ('display_data', 'execute_result'):
                data, meta = o.get('data', {}), o.get('metadata', {})
                md = src_of(data.get('text/markdown'))
                if md and (asis or _re_showdoc.match(md)): # show_doc's entry, `display`ed in a loop (no `output: asis`) as well
                    entry = api_entry(md, self.markdown, self.seen, self.readme)
                    blocks.append(entry if entry is not None else self.markdown(md)); continue
                img = next((m for m in ('image/png', 'image/jpeg', 'image/svg+xml', 'image/gif') if m in data), None)
                if img:
                    k += 1
                    ext = {'image/png': 'png', 'image/jpeg': 'jpg', 'image/svg+xml': 'svg', 'image/gif': 'gif'}[img]
                    raw = src_of(data[img])
                    payload = raw.encode() if ext == 'svg' else base64.b64decode(raw)
                    link = self.write_file(f'cell-{n}-output-{k}.{ext}', payload)
                    alt = str(opts.get('fig-alt') or opts.get('fig-cap') or f'Output of cell {n}')
                    cap = opts.get('fig-cap')
                    w = (meta.get(img) or {}).get('width') if isinstance(meta.get(img), dict) else None
                    w = w or (png_width(payload) if ext == 'png' else None)
                    width = f' width="{int(w)}"' if w else ''
                    if self.readme:
                        blocks.append(f'<img src="{html.escape(link)}" alt="{html.escape(alt)}"{width}>' + (f'\n\n*{cap}*' if cap else ''))
                    else:
                        fig = (f'<figure class="cell-figure"><img src="{html.escape(link)}" alt="{html.escape(alt)}"{width}>'
                               + (f'<figcaption markdown="span">{cap}</figcaption>' if cap else '') + '</figure>')
                        blocks.append(f'<div class="cell-output cell-output-display" markdown>\n{fig}\n</div>')
                elif 'text/html' in data:
                    h = src_of(data['text/html'])
                    if is_progress_html(h): continue
                    h = '\n'.join(l for l in h.split('\n') if l.strip())
                    if self.readme: blocks.append(h)
                    else: blocks.append(f'<div class="cell-output cell-output-html">\n{h}\n</div>')
                elif 'text/markdown' in data:
                    blocks.append(self.markdown(src_of(data['text/markdown']), links=True))
                elif 'text/plain' in data:
                    text = clean_stream(src_of(data['text/plain']))
                    if text and not _skip_plain.match(text.strip()): blocks.append(self.text_block(text))
        return blocks

    def text_block(self, text):
        if self.readme: return fence(text)
        return f'<div class="cell-output cell-output-stdout" markdown>\n\n{fence(text, "text")}\n\n</div>'

    def markdown(self, md, links=False):
        "Markdown of a cell or an output (nbdev's add_links has linked the cells' `symbols` already)"
        if links: md = self.site.linkify(md)
        if not self.readme: md = convert_callouts(md)
        return rewrite_markdown(md, self.site, self.md_rel, self.seen, self.readme, self.asset)

    def render(self):
        fm = self.site.frontmatter(self.nb)
        title, desc = fm.get('title'), fm.get('description')
        parts, n = [], 0
        if self.readme:
            if title: parts.append(f'# {title}')
            parts.append('<!-- WARNING: THIS FILE WAS AUTOGENERATED from nbs/index.ipynb by docs/build.sh! DO NOT EDIT! -->')
            if desc: parts.append(f'> {desc}')
        else:
            meta = {k: v for k, v in dict(title=title, description=plain(desc)).items() if v}
            if meta: parts.append('---\n' + yaml.safe_dump(meta, allow_unicode=True, width=1000).strip() + '\n---')
            if title: parts.append(f'# {title}')
            if desc: parts.append(f'<p class="page-description" markdown="span">{self.markdown(desc)}</p>')
        for c in self.nb['cells']:
            src = src_of(c['source'])
            if c['cell_type'] == 'raw': continue
            if c['cell_type'] == 'markdown':
                if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
                parts.append(self.markdown(src)); continue
            if c['cell_type'] != 'code': continue
            n += 1
            opts, code = directives(src)
            if 'hide' in opts or falsy(opts.get('include', True)): continue
            block = []
            if code.strip() and not falsy(opts.get('echo', True)):
                cb = fence(code, 'python')
                fold = opts.get('code-fold')
                if fold and not falsy(fold) and not self.readme:
                    summ = opts.get('code-summary', 'Code')
                    cb = f'???{"+" if str(fold) == "show" else ""} code "{summ}"\n\n' + '\n'.join('    ' + l for l in cb.split('\n'))
                block.append(cb)
            if not falsy(opts.get('output', True)): block += self.outputs(c, n, opts)
            if block: parts.append('\n\n'.join(block))
        return '\n\n'.join(p.strip('\n') for p in parts if p.strip()) + '\n'

    def write(self):
        text = self.render()
        dest = self.site.readme if self.readme else self.site.docs/self.md_rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        for rel, data in self.files.items():
            p = self.dest_dir/rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return dest


# ---------------------------------------------------------------------------------------------------- navigation
def nav_from_sidebar(site):
    "`nbs/sidebar.yml` -> mkdocs nav; every notebook must be listed (a new notebook just needs its line)"
    sb = yaml.safe_load((site.nbs/'sidebar.yml').read_text())
    contents = sb['website']['sidebar']['contents']
    listed = set()
    def conv(items):
        nav = []
        for it in items or []:
            if isinstance(it, str): nav.append(page_of(it))
            elif isinstance(it, dict) and 'section' in it:
                nav.append({str(it['section']): conv(it.get('contents'))})
            elif isinstance(it, dict) and 'href' in it:
                p = page_of(it['href'])
                nav.append({str(it['text']): p} if it.get('text') else p)
            elif isinstance(it, dict) and 'contents' in it: nav += conv(it['contents'])
            else: sys.exit(f"nbs/sidebar.yml: cannot read the entry {it!r}")
        return nav
    def page_of(name):
        nb = Path(name)
        if nb not in site.pages: sys.exit(f"nbs/sidebar.yml lists {name}, which is not a notebook in {site.nbs}/")
        listed.add(nb)
        return site.pages[nb].as_posix()
    nav = conv(contents)
    missing = [str(nb) for nb in site.nb_files if nb not in listed]
    if missing: sys.exit(f"Add these notebooks to nbs/sidebar.yml (one line each, in reading order): {', '.join(missing)}")
    return nav


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--proc', default=str(ROOT/'_proc'))
    ap.add_argument('--nbs', default=None, help="the notebooks (default: nbdev's nbs_path)")
    ap.add_argument('--out', default=str(ROOT/'_mkdocs'))
    ap.add_argument('--readme', default=str(ROOT/'README.md'))
    ap.add_argument('--readme-nb', default='index.ipynb')
    a = ap.parse_args()
    cfg = get_config()
    site = Site(a.proc, a.nbs or cfg.nbs_path, a.out, a.readme)
    nav = nav_from_sidebar(site)
    if site.out.exists(): shutil.rmtree(site.out)
    site.docs.mkdir(parents=True)
    # two passes: the first learns each page's anchors, so that links to symbols without an entry can be dropped
    site.anchors = {site.pages[nb]: (pg := Page(site, nb), pg.render())[0].seen for nb in site.nb_files}
    for nb in site.nb_files: Page(site, nb).write()
    for page, sym, url in sorted(site.unlinked):
        print(f"note: {page} mentions `{sym}`, which has no show_doc entry ({url}): left unlinked", file=sys.stderr)
    shutil.copytree(ROOT/'docs'/'assets', site.docs/'assets')
    conf = {'INHERIT': _relpath(ROOT/'docs'/'mkdocs.yml', site.out), 'site_name': cfg.get('title') or cfg.lib_name,
            'site_description': cfg.get('description', ''), 'site_url': site.url, 'docs_dir': 'docs',
            'site_dir': _relpath(ROOT/'_site', site.out), 'nav': nav}
    (site.out/'mkdocs.yml').write_text('# Written by docs/nb2md.py: the settings are in docs/mkdocs.yml\n'
                                       + yaml.safe_dump(conf, sort_keys=False, allow_unicode=True))
    # README: the index page, its figures in README_files/ (nbdev's place for them), its links to the docs site
    rd = site.readme.parent/'README_files'
    if rd.exists(): shutil.rmtree(rd)
    if Path(a.readme_nb) in site.pages: Page(site, Path(a.readme_nb), readme=True).write()
    print(f"{len(site.nb_files)} pages in {site.docs}, README in {site.readme}")


if __name__ == '__main__': main()
