import warnings
import pytest, torch
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
        params=[p.detach().clone() for p in model.parameters()],
        buffers=[b.detach().clone() for b in model.buffers()],
    )


def assert_same_state(a, b):
    assert a['training'] == b['training']
    assert a['requires_grad'] == b['requires_grad']
    assert a['hooks'] == b['hooks']
    assert len(a['grads']) == len(b['grads'])
    for g, h in zip(a['grads'], b['grads']):
        assert (g is None) == (h is None)
        if g is not None: assert torch.equal(g, h)
    for x, y in zip(a['params'] + a['buffers'], b['params'] + b['buffers']): assert torch.equal(x, y)


@pytest.fixture(scope='session')
def demo():
    "The demo learner (trained once, then cached by `demo_learner`)"
    from fastai_heatmap.data import demo_learner
    return demo_learner()
