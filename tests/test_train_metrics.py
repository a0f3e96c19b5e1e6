"""Epoch means of the training metrics (running sums on the device, logged once per epoch)."""

from __future__ import annotations

import pytest
import torch

from batchmates.methods.train_metrics import EpochMeans

torch.set_num_threads(1)


def test_epoch_means_are_batch_weighted_and_resume_exactly():
    m = EpochMeans()
    steps = [(64, {"loss": torch.tensor(2.0), "acc": 0.25}), (32, {"loss": torch.tensor(1.0), "acc": 0.5}),
             (64, {"loss": torch.tensor(0.5)})]
    for bs, v in steps[:2]:
        m.add(bs, v, torch.device("cpu"))
    saved = m.state_dict()
    resumed = EpochMeans()
    resumed.load_state_dict(saved)
    for target in (m, resumed):
        target.add(*steps[2], torch.device("cpu"))
    a, b = m.pop(), resumed.pop()
    assert a["loss"][1] == 160 and a["acc"][1] == 96
    assert float(a["loss"][0]) == pytest.approx((64 * 2.0 + 32 * 1.0 + 64 * 0.5) / 160)
    assert float(a["acc"][0]) == pytest.approx((64 * 0.25 + 32 * 0.5) / 96)
    assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
    assert m.pop() == {}  # popped: the next epoch starts from zero


def test_train_loss_row_is_the_mean_of_the_step_losses(tmp_path, monkeypatch):
    import lightning as L

    from batchmates.config import RunConfig
    from batchmates.training import run as run_mod

    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    original = run_mod._trainer

    def trainer_with_recorder(cfg, model, verbose):
        trainer, history = original(cfg, model, verbose)
        trainer.callbacks.append(Record())
        return trainer, history

    monkeypatch.setattr(run_mod, "_trainer", trainer_with_recorder)
    m = run_mod.train(RunConfig(method="ce", data="digits", epochs=2, batch_size=64, threads=1, progress=False,
                                eval_protocols=["accuracy"], out=str(tmp_path / "ce")), verbose=False)
    per_epoch = 1347 // 64
    assert len(losses) == 2 * per_epoch and [r["step"] for r in m["curve"]] == [per_epoch, 2 * per_epoch]
    for e, row in enumerate(m["curve"]):
        epoch = losses[e * per_epoch:(e + 1) * per_epoch]
        assert row["train_loss"] == pytest.approx(sum(epoch) / len(epoch), rel=1e-5)
        assert 0.0 <= row["train_acc"] <= 1.0
