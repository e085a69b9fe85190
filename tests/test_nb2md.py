"The notebook -> Markdown step of the docs build (docs/nb2md.py), on a small processed notebook made here: fast, no Quarto."
import base64, io, json, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT/'docs'))
nb2md = pytest.importorskip('nb2md')


def _png(w=300, h=200, dpi=200):
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(w/dpi, h/dpi), dpi=dpi); buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=dpi); plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def code(src, *outputs): return dict(cell_type='code', source=src, metadata={}, outputs=list(outputs), execution_count=1)
def md(src): return dict(cell_type='markdown', source=src, metadata={})
def result(**data): return dict(output_type='execute_result', data=data, metadata={}, execution_count=1)
def display(**data): return dict(output_type='display_data', data=data, metadata={})
def stream(text, name='stdout'): return dict(output_type='stream', name=name, text=text)

SHOW_DOC = '''---

[source](https://github.com/o/r/blob/main/pkg/m.py#L1){target="_blank" style="float:right; font-size:smaller"}

### Thing.plot

```python
def plot(
    k, # How many
    nrows:int | None=None, ncols:int | None=None, # Grid shape
    *, bs:int=64, **kwargs
)->Figure: # passed on
```

*Plot `k` things*'''

BAR = ('█ |----------------------------------------| 0.00% [0/3 00:00<?] |█████████████--------------------------'
       '-| 33.33% [1/3 00:00<00:00] |████████████████████████████████████████| 100.00% [3/3 00:00<00:00]    \n')
PANDAS = ('<div>\n<style scoped>\n    .dataframe tbody tr th { vertical-align: top; }\n</style>\n'
          '<table border="1" class="dataframe">\n  <thead>\n    <tr><th>name</th><th>cost</th></tr>\n  </thead>\n'
          '  <tbody>\n    <tr><td>gradcam</td><td>1</td></tr>\n  </tbody>\n</table>\n</div>')
FASTPROGRESS = "<div><progress value='3' class='' max='3' style='width:300px;'></progress> 100.00% [3/3 00:00<00:00]</div>"


def make_site(tmp_path):
    "Two processed notebooks (and their sources) in tmp_path, and the Site over them"
    nbs, proc = tmp_path/'nbs', tmp_path/'_proc'
    nbs.mkdir(); proc.mkdir()
    (nbs/'img.png').write_bytes(base64.b64decode(_png()))
    cells = [dict(cell_type='raw', metadata={}, source='---\ndescription: What `Thing` is for\noutput-file: thing.html\n'
                                                          'title: The thing\n---\n'),
             md('## A section\n\nSee [the other page](01_other.ipynb#a-section), [`Thing.plot`](other.html), '
                'an image ![a picture](img.png) and `[not a link](x.html)`.'),
             code('#| echo: false\n#| output: asis\nshow_doc(Thing.plot)', display(**{'text/markdown': SHOW_DOC, 'text/plain': 'x'})),
             code('df = list_methods()\ndf', result(**{'text/html': PANDAS, 'text/plain': 'name cost'})),
             code('learn.fit(1)', stream(BAR), stream('UserWarning: careful\n', 'stderr'), display(**{'text/html': FASTPROGRESS}),
                  stream('epoch  loss\n0      0.5\n')),
             code('#| output: false\nsecret_output()', stream('should not appear\n')),
             code('#| include: false\nhidden_cell()', stream('hidden\n')),
             code('#| echo: false\nno_code_shown()', display(**{'image/png': _png(), 'text/plain': '<Figure size 150x100 with 0 Axes>'})),
             md('::: {.callout-note}\nA note.\n:::\n\n## A section'),
             code('#| code-fold: show\ndef folded(): pass'),
             code('#| echo: false\nfor f in (Thing.draw,): display(show_doc(f))', # displayed in a loop, without `output: asis`
                  display(**{'text/markdown': SHOW_DOC.replace('Thing.plot', 'Thing.draw').replace('def plot(', 'def draw('), 'text/plain': 'def draw('}))]
    nb = dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)
    (nbs/'00_thing.ipynb').write_text(json.dumps(nb)); (proc/'00_thing.ipynb').write_text(json.dumps(nb))
    other = dict(cells=[dict(cell_type='raw', metadata={}, source='---\ntitle: Other\noutput-file: other.html\n---\n'),
                        md('## A section')], metadata={}, nbformat=4, nbformat_minor=5)
    (nbs/'01_other.ipynb').write_text(json.dumps(other)); (proc/'01_other.ipynb').write_text(json.dumps(other))
    return nb2md.Site(proc, nbs, tmp_path/'out', tmp_path/'README.md')


@pytest.fixture()
def page(tmp_path):
    p = nb2md.Page(make_site(tmp_path), Path('00_thing.ipynb'))
    return p, p.render()


def test_page(page):
    p, text = page
    assert p.md_rel == Path('thing.md')
    assert text.startswith('---\ndescription: What Thing is for\ntitle: The thing\n---\n\n# The thing')
    assert '## A section { #a-section }' in text and '## A section { #a-section-1 }' in text     # pandoc's ids
    assert '[the other page](other.md#a-section)' in text and '[`Thing.plot`](other.md)' in text  # Quarto links -> pages
    assert '`[not a link](x.html)`' in text                                                     # code left alone
    assert '![a picture](img.png)' in text and 'img.png' in p.files
    # show_doc -> an API entry with the Quarto anchor, a short signature and a docments table
    assert '### Thing.plot { #thing.plot .doc-heading' in text
    assert "plot(k, nrows=None, ncols=None, *, bs=64, **kwargs)" in text
    assert '| `k` |  |  | How many |' in text
    assert '| `nrows` | `int | None` | `None` |  |' in text and '| `ncols` | `int | None` | `None` | Grid shape |' in text
    assert '| `**kwargs` |  |  | passed on |' in text and '| **Returns** | `Figure` |' in text   # fastcore's kwargs quirk
    assert '<div class="doc-source"><a href="https://github.com/o/r/blob/main/pkg/m.py#L1"' in text
    # a show_doc displayed in a loop (no `output: asis`) is an API entry too, not its signature as code
    assert '### Thing.draw { #thing.draw .doc-heading' in text and 'draw(k, nrows=None, ncols=None, *, bs=64, **kwargs)' in text
    assert 'def draw(' not in text
    # outputs: pandas kept, progress bars and stderr dropped, other text kept, options honoured
    assert '<table border="1" class="dataframe">' in text and 'cell-output-html' in text
    assert '%' not in text.split('learn.fit(1)')[1].split('```python')[0] and '<progress' not in text
    assert 'careful' not in text and 'epoch  loss\n0      0.5' in text
    assert 'secret_output()' in text and 'should not appear' not in text
    assert 'hidden' not in text
    assert 'no_code_shown' not in text and 'Figure size' not in text
    img = [k for k in p.files if k.startswith('thing_files/')]
    assert img == ['thing_files/cell-6-output-1.png'] and 'width="150"' in text               # 300 px at 200 dpi
    assert '<div class="admonition note" markdown>' in text and 'A note.' in text and ':::' not in text
    assert '???+ code "Code"\n\n    ```python\n    def folded(): pass\n    ```' in text                  # nbdev's `exports`


def test_readme(page):
    p, _ = page
    r = nb2md.Page(p.site, Path('00_thing.ipynb'), readme=True).render()
    url = p.site.url
    assert r.startswith('# The thing\n') and '> What `Thing` is for' in r
    assert f'[the other page]({url}other.html#a-section)' in r                                   # absolute docs links
    assert '<img src="README_files/figure-commonmark/cell-6-output-1.png"' in r
    assert '{ #' not in r and 'markdown>' not in r                                                # plain GitHub Markdown
