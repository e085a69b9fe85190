"""tests/run.sh runs every stage even after one fails, prints one summary line per stage, and exits non-zero if any failed.
Checked with stand-ins for the stages' commands, in a copy of the script (the real stages are what the script runs in CI)."""
import os, shutil, stat, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stub(d, name, rc=0):
    p = d/name
    p.write_text(f"#!/usr/bin/env bash\necho \"{name} ran $*\"\nexit {rc}\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path, failing=()):
    repo, bin_ = tmp_path/'repo', tmp_path/'bin'
    (repo/'tests').mkdir(parents=True); (repo/'docs').mkdir(); bin_.mkdir()
    shutil.copy(ROOT/'tests'/'run.sh', repo/'tests'/'run.sh')
    (repo/'docs'/'check.sh').write_text(f"echo docs ran\nexit {1 if 'docs' in failing else 0}\n")
    subprocess.run(['git', 'init', '-q', str(repo)], check=True)
    for name, stage in [('nbdev-export', 'sync'), ('nbdev-clean', 'sync'), ('fastai-heatmap', 'demo'), ('nbdev-test', 'nbdev'), ('python', 'pytest')]:
        _stub(bin_, name, 1 if stage in failing else 0)
    env = {**os.environ, 'PATH': f"{bin_}:{os.environ['PATH']}"}
    return subprocess.run(['bash', str(repo/'tests'/'run.sh')], capture_output=True, text=True, env=env)


def _summary(out): return [l.split() for l in out.split('Summary')[1].splitlines()[1:] if l.startswith('  ')]


def test_all_stages_pass(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _summary(r.stdout)
    assert [o[1] for o in rows] == ['sync', 'demo', 'nbdev', 'pytest', 'docs'] and all(o[0] == 'passed' for o in rows)
    assert all(o[2].endswith('s') for o in rows)  # each with its time


def test_a_failing_stage_hides_nothing(tmp_path):
    r = _run(tmp_path, failing=('nbdev',))
    assert r.returncode != 0
    rows = {o[1]: o[0] for o in _summary(r.stdout)}
    assert rows == dict(sync='passed', demo='passed', nbdev='FAILED', pytest='passed', docs='passed')
    assert 'python ran -m pytest' in r.stdout and 'docs ran' in r.stdout  # the stages after the failing one still ran
    r = _run(tmp_path/'2', failing=('docs', 'sync'))
    assert r.returncode != 0 and {o[1]: o[0] for o in _summary(r.stdout)} == dict(sync='FAILED', demo='passed', nbdev='passed', pytest='passed', docs='FAILED')
