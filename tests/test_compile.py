"""Every loss and batch-relational layer traces into one graph (zero graph breaks) with its value checks off.

Issue 9, item 7: value checks (``check_finite``) are the only host syncs of the losses and layers; switched off,
``torch.compile(fullgraph=True)`` must be possible. Counted with ``torch._dynamo.explain`` on the CPU, in training
mode (where the batch is related), on small shapes. The checks-on counterpart shows the test can fail: the CPU
default (``check_finite=None``) checks, and a check is a graph break.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from batchmates.losses import BarlowTwinsLoss, CCLoss, NTXentLoss, SupConLoss, SwAVLoss
from batchmates.nn import (
    BA2M,
    BatchFormer,
    BatchTransformerHead,
    ClassBatchAttention,
    IntraBatchAttention,
    MultiLevelAttention,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # about 25 s on one CPU thread: dynamo traces 20 modules


def _g(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def _labels(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) % k


# name -> (module with checks off, inputs)
CASES: dict[str, Callable[[], tuple[torch.nn.Module, tuple]]] = {
    "SupConLoss": lambda: (SupConLoss(check_finite=False), (_g(8, 2, 16), _labels(8, 3))),
    "SupConLoss-chunked": lambda: (SupConLoss(chunk_size=4, check_finite=False), (_g(8, 2, 16), _labels(8, 3))),
    "SupConLoss-mask": lambda: (SupConLoss(check_finite=False), (_g(6, 2, 16), None, torch.eye(6))),
    "NTXentLoss": lambda: (NTXentLoss(check_finite=False), (_g(8, 16), _g(8, 16) + 1)),
    "BarlowTwinsLoss": lambda: (BarlowTwinsLoss(check_finite=False), (_g(8, 32), _g(8, 32) + 1)),
    "BarlowTwinsLoss-cross": lambda: (BarlowTwinsLoss(algorithm="cross", check_finite=False), (_g(8, 4), _g(8, 4))),
    "CCLoss": lambda: (CCLoss(num_classes=3, check_finite=False), (torch.sigmoid(_g(8, 6)), _labels(8, 3))),
    "CCLoss-ratio": lambda: (
        CCLoss("ratio", num_classes=3, check_finite=False),
        (torch.sigmoid(_g(8, 6)), _labels(8, 3)),
    ),
    "SwAVLoss": lambda: (SwAVLoss(validate=False), ([_g(8, 10), _g(8, 10) + 1], [_g(8, 10) - 1])),
    "BA2M": lambda: (BA2M(16, check_finite=False), (_g(4, 16, 6, 6),)),
    "ClassBatchAttention": lambda: (
        ClassBatchAttention(check_finite=False),
        (_g(4, 3, 5), _g(4, 3, 5).flip(0), _g(4, 3)),
    ),
    "MultiLevelAttention": lambda: (
        MultiLevelAttention([4, 8], dim=8, tokens=2, num_heads=2),
        ([_g(4, 4, 4, 4), _g(4, 8, 2, 2)],),
    ),
    "BatchTransformerHead": lambda: (
        BatchTransformerHead([4, 8], 3, feature_map_size=(2, 2), mla_dim=8, mla_heads=2, mla_tokens=2,
                             check_finite=False),
        ([_g(4, 4, 4, 4), _g(4, 8, 2, 2)],),
    ),
    "IntraBatchAttention-mean": lambda: (IntraBatchAttention(16, 2, mode="mean", check_finite=False), (_g(4, 5, 16),)),
    "IntraBatchAttention-element": lambda: (
        IntraBatchAttention(16, 2, mode="element", check_finite=False, bank_size=4),
        (_g(4, 5, 16),),
    ),
    "BatchFormer": lambda: (BatchFormer(16, 2, check_finite=False), (_g(4, 16),)),
}  # fmt: skip


def _breaks(module: torch.nn.Module, args: tuple) -> tuple[int, list[str]]:
    torch._dynamo.reset()
    if hasattr(module, "reset_running_stats"):
        # IntraBatchAttention sizes its training statistics from the data ([heads, tokens, head_dim], like a lazy
        # module) on its first training call, and EIBA's key/value bank grows until it holds bank_size samples;
        # after that every training call keeps their shapes, and it is those steady-state calls that must compile
        # whole.
        with torch.no_grad():
            module.train()(*args)
    out = torch._dynamo.explain(module.train())(*args)
    where = []
    for b in out.break_reasons:
        frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in b.user_stack[-3:]]
        where.append(f"{str(b.reason).splitlines()[0]} at {' <- '.join(reversed(frames))}")
    return out.graph_break_count, where


@pytest.mark.parametrize("name", list(CASES))
def test_zero_graph_breaks_with_checks_off(name):
    module, args = CASES[name]()
    count, where = _breaks(module, args)
    assert count == 0, f"{name}: {count} graph break(s) with checks off:\n" + "\n".join(where)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (SupConLoss(), (_g(8, 2, 16), _labels(8, 3))),
        lambda: (BarlowTwinsLoss(), (_g(8, 32), _g(8, 32) + 1)),
        lambda: (CCLoss(num_classes=3), (torch.sigmoid(_g(8, 6)), _labels(8, 3))),
        lambda: (ClassBatchAttention(), (_g(4, 3, 5), _g(4, 3, 5), _g(4, 3))),
    ],
    ids=["SupConLoss", "BarlowTwinsLoss", "CCLoss", "ClassBatchAttention"],
)
def test_default_checks_run_on_cpu(make):
    """The default (``check_finite=None``) checks on the CPU: a NaN is refused, and the check is what breaks."""
    module, args = make()
    count, _ = _breaks(module, args)
    assert count >= 1
    bad = tuple(a.clone() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    bad[0].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        module(*bad)


def test_ba2m_running_eval_has_no_graph_break() -> None:
    """Independent eval with the running partition (BA²M's default eval form) compiles whole too."""
    module = BA2M(16, check_finite=False)
    x = _g(4, 16, 6, 6)
    with torch.no_grad():
        module.train()(x)  # one tracked batch, so the running form is in use
    torch._dynamo.reset()
    out = torch._dynamo.explain(module.eval())(x)
    assert int(module.z_tracked) == 1 and module.eval_form == "running"
    assert out.graph_break_count == 0, [str(b.reason) for b in out.break_reasons]
