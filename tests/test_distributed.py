"""Several processes sharing the work (nbs/05a_distributed.ipynb): two CPU processes (gloo) started by `torchrun` and by
`accelerate launch --multi_gpu` give what one process gives, every image once, a corrupt file on one process is reported
while the others finish, and the case where every process would do all the work is refused. Each launch has a time limit
(the whole process group is killed past it), so that a process waiting for another fails the test instead of hanging it."""
import os, shutil, signal, subprocess, sys, textwrap, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from fastai.learner import load_learner
from fastai_heatmap.all import *
from fastai_heatmap.cli import main

warnings.filterwarnings('ignore', category=UserWarning)
pytest.importorskip('accelerate')
ROOT = Path(__file__).parents[1]
LIMIT = 240  # seconds for one launch: about 15 s on two busy cores


def _env(**kw):
    "The environment of a launch: this checkout's package first, CPU processes whatever the machine has"
    env = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]),
               MPLBACKEND='Agg', ACCELERATE_USE_CPU='1', CUDA_VISIBLE_DEVICES='', PYTHONWARNINGS='ignore')
    env.update(kw)
    return env


def _run(cmd, **env):
    "Run `cmd` in its own process group; past `LIMIT` seconds kill the group (the launcher and every process it started) and fail"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env), cwd=ROOT, start_new_session=True)
    try: out, err = p.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} ran past {LIMIT} s (a process waiting for another?)\n{out}\n{err[-3000:]}")
    return p.returncode, out, err


def _torchrun(*args): return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(29500 + os.getpid() % 1000), *map(str, args)]
def _accelerate(*args): return [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
                                '--dynamo_backend', 'no', '--main_process_port', str(30500 + os.getpid() % 1000), *map(str, args)]


@pytest.fixture(scope='module')
def data(demo, tmp_path_factory):
    """The exported demo learner, and a labelled folder of 24 validation images of the 4 classes with a corrupt file that
    sorts last: 25 files, which 2 processes cannot share evenly, and the corrupt one falls to the second"""
    d = tmp_path_factory.mktemp('dist')
    demo.export(d/'model.pkl')
    for f in demo.dls.valid_ds.items[::6][:24]:
        (d/'imgs'/f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d/'imgs'/f.parent.name/f.name)
    (d/'imgs'/'7'/'zzz_broken.png').write_bytes(b'not a png')
    files = sorted((d/'imgs').rglob('*.png'))
    assert len(files) == 25 and files[-1].name == 'zzz_broken.png' and len({f.parent.name for f in files}) == 4
    return d


@pytest.mark.timeout(LIMIT + 120)
def test_explain(data, tmp_path):
    "`explain` by 2 processes: the predictions.csv and the maps of 1 process, every image once; the corrupt file (on process 1) reported"
    assert main(['explain', str(data/'model.pkl'), str(data/'imgs'), '--out', str(tmp_path/'one'), '--maps']) == 1
    rc, out, err = _run(_torchrun('-m', 'fastai_heatmap.cli', 'explain', data/'model.pkl', data/'imgs', '--out', tmp_path/'two', '--maps'))
    assert rc == 1, err[-3000:]  # a file failed: exit status 1, from every process
    assert out.count('Wrote 24 heatmaps and predictions.csv') == 1 and 'by 2 processes; 1 file(s) failed' in out, out
    assert err.count('skipped ') == 1 and 'zzz_broken.png' in err
    one, two = pd.read_csv(tmp_path/'one'/'predictions.csv'), pd.read_csv(tmp_path/'two'/'predictions.csv')
    assert len(two) == 24 and two['file'].is_unique and two['file'].tolist() == sorted(two['file'])
    pd.testing.assert_frame_equal(one.drop(columns='probability'), two.drop(columns='probability'))
    assert np.abs(one['probability'] - two['probability']).max() <= 1e-4  # rounded to 4 decimals from floats that may differ by 1e-7
    assert sorted(p.name for p in (tmp_path/'two').glob('*.png')) == sorted(two['heatmap'])
    for name in two['heatmap']:
        a, b = np.load(tmp_path/'one'/name.replace('.png', '.npy')), np.load(tmp_path/'two'/name.replace('.png', '.npy'))
        assert a.shape == (64, 64) and np.abs(a - b).max() <= 1e-5


@pytest.mark.timeout(LIMIT + 120)
def test_classes(data, tmp_path):
    "`classes` by 2 processes under `accelerate launch --multi_gpu`: the counts and border shares of 1 process"
    assert main(['classes', str(data/'model.pkl'), str(data/'imgs'), '--out', str(tmp_path/'one')]) == 1
    rc, out, err = _run(_accelerate('-m', 'fastai_heatmap.cli', 'classes', data/'model.pkl', data/'imgs', '--out', tmp_path/'two'))
    assert rc == 1, err[-3000:]
    assert 'Class heatmaps of 24 images' in out and 'by 2 processes; 1 file(s) failed' in out, out
    assert err.count('skipped ') == 1 and 'zzz_broken.png' in err
    one, two = pd.read_csv(tmp_path/'one'/'class_heatmaps.csv'), pd.read_csv(tmp_path/'two'/'class_heatmaps.csv')
    assert two['n'].tolist() == one['n'].tolist() and two['n'].sum() == 24 and (two['n'] > 0).all()
    assert np.abs(one['border_share'] - two['border_share']).max() <= 1e-4
    assert (tmp_path/'two'/'class_heatmaps.png').stat().st_size > 0


SCRIPT = textwrap.dedent('''
    import sys, torch
    from fastai.learner import load_learner
    from fastai.data.transforms import get_image_files
    from fastai_heatmap.all import *
    pkl, folder, out = sys.argv[1:]
    p = processes()
    learn = load_learner(pkl)
    files = sorted(f for f in get_image_files(folder) if 'broken' not in f.name)
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(files, with_labels=True))
    ch, ch2 = interp.class_heatmaps(), interp.class_heatmaps(target='pred', max_n=2)
    cm = interp.confusion_matrix()
    one = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(files[:1], with_labels=True)).class_heatmaps() # process 1 has no item
    maps = gather_cat(learn.heatmap(shard(files)))                        # the explain loop, shared out by hand
    learn.model = torch.nn.parallel.DistributedDataParallel(learn.model)  # as a DDP-trained learner has it:
    own = learn.heatmap(files[:3] if p.rank == 0 else files[3:5])         # unequal work per process, no collective
    if p.main: torch.save(dict(size=p.size, threads=torch.get_num_threads(), losses=interp.losses, ch=ch._asdict(), ch2=ch2._asdict(),
                               one=one._asdict(), cm=cm, maps=maps, own=own), out)
''')


@pytest.mark.timeout(LIMIT + 120)
def test_python_api(data, tmp_path):
    """The Python API in a script started as 2 processes: interpretation, class heatmaps (also of one image: a process with
    nothing to add), confusion matrix and shared-out maps equal one process's; each process has cores // 2 threads"""
    (tmp_path/'script.py').write_text(SCRIPT)
    rc, out, err = _run(_torchrun(tmp_path/'script.py', data/'model.pkl', data/'imgs', tmp_path/'res.pt'))
    assert rc == 0, err[-3000:]
    res = torch.load(tmp_path/'res.pt', weights_only=False)
    learn = load_learner(data/'model.pkl')
    files = sorted(f for f in (data/'imgs').rglob('*.png') if 'broken' not in f.name)
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(files, with_labels=True))
    assert res['size'] == 2 and res['threads'] == max(1, cpu_cores() // 2)
    assert torch.allclose(res['losses'], interp.losses, atol=1e-5)
    assert (res['cm'] == interp.confusion_matrix()).all()
    one = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(files[:1], with_labels=True)).class_heatmaps()
    for got, ref in ((res['ch'], interp.class_heatmaps()), (res['ch2'], interp.class_heatmaps(target='pred', max_n=2)), (res['one'], one)):
        assert torch.equal(got['counts'], ref.counts) and ref.counts.sum() > 0
        assert torch.allclose(got['maps'], ref.maps, atol=1e-5) and torch.allclose(got['images'], ref.images.to(got['images'].dtype), atol=1e-3)
        assert got['layer'] == ref.layer and got['method'] == ref.method
    assert torch.allclose(res['maps'], learn.heatmap(files), atol=1e-5)
    assert torch.allclose(res['own'], learn.heatmap(files[:3]), atol=1e-5)


def test_refuses_every_process_doing_everything(tmp_path):
    """One of 2 processes an MPI launcher started, in a script whose `PartialState()` (without cpu=True, on a machine without
    GPUs) set up no process group: it would do all the work, as would the other; refused"""
    code = "from accelerate import PartialState; PartialState(); from fastai_heatmap.distributed import processes; processes()"
    rc, out, err = _run([sys.executable, '-c', code], PMI_SIZE='2', PMI_RANK='0', ACCELERATE_USE_CPU='')
    assert rc != 0 and 'LaunchError' in err and 'each would explain every item' in err and 'cpu=True' in err, err[-2000:]


def test_without_accelerate(tmp_path):
    "Without Accelerate the package imports and runs in one process; launched as several, it says what to install"
    code = ("import sys; sys.modules['accelerate'] = None\n"  # as if it were not installed
            "import fastai_heatmap.all, fastai_heatmap.cli\n"
            "from fastai_heatmap.distributed import processes\n"
            "print(processes().size)")
    rc, out, err = _run([sys.executable, '-c', code])
    assert rc == 0 and out.strip() == '1', err[-2000:]
    rc, out, err = _run([sys.executable, '-c', code], WORLD_SIZE='2', RANK='0', LOCAL_RANK='0')
    assert rc != 0 and "pip install 'fastai-heatmap[distributed]'" in err, err[-2000:]
