"""The ``ba2m`` method end to end: the paper's raw weights no longer collapse at test, eval modes agree.

Independent eval multiplies by the expected training factor (1/N_train for ``weight_mode="raw"``); before, it
multiplied by 1 and a network trained with raw weights scored chance at test. Trained here on digits with the
residual backbone (the plain CNN feeds the last raw-weighted map straight to the classifier, so raw weights
shrink its logits N-fold and it does not train: a property of the equations, documented in the module).
"""

from __future__ import annotations

import json

import pytest
import torch

from batchmates.cli import main
from batchmates.nn import BA2M
from batchmates.training.run import load_run


def _accuracy(model, splits, eval_mode: str, batch_size: int) -> float:
    for m in model.modules():
        if isinstance(m, BA2M):
            m.eval_mode = eval_mode
    model.eval()
    x, y = model.normalize(splits.test.images), splits.test.labels
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = torch.cat([model.classify(x[perm[i : i + batch_size]]) for i in range(0, len(x), batch_size)])
    return float((logits.argmax(1) == y[perm]).float().mean())


@pytest.mark.slow
def test_raw_weights_train_and_evaluate_above_chance_in_both_eval_modes(tmp_path) -> None:
    out = tmp_path / "raw"
    args = ["train", "--method", "ba2m", "--data", "digits", "--backbone", "resnet-small", "--epochs", "3",
            "--batch-size", "64", "--threads", "1", "--no-progress", "--protocol", "accuracy",
            "--checkpoint-every", "0", "--opt", "weight_mode=raw", "--out", str(out)]
    assert main(args) == 0
    model, cfg, splits = load_run(str(out))
    layers = [m for m in model.modules() if isinstance(m, BA2M)]
    assert layers and all(m.weight_mode == "raw" and int(m.n_train) == 64 for m in layers)
    independent = _accuracy(model, splits, "independent", 64)
    batch = _accuracy(model, splits, "batch", 64)
    assert independent > 0.3, independent  # chance is 0.1; before the expected-factor eval it scored ~0.1
    assert abs(independent - batch) < 0.05, (independent, batch)

    # `batchmates eval --eval-mode batch` merges its result beside the run's own (independent) evaluation
    before = json.loads((out / "metrics.json").read_text())
    assert main(["eval", str(out), "--protocol", "accuracy", "--eval-mode", "batch"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert after.get("eval") == before.get("eval") and after["test_acc"] == before["test_acc"]
    assert abs(after["eval_batch"]["accuracy"]["top1"] - before["test_acc"]) < 0.05
