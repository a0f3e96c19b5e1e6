"""The training engine on a GPU (skipped without CUDA; scripts/gpu_study.sh runs these first)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.cuda
def test_in_memory_training_data_lives_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from batchmates.config import RunConfig
    from batchmates.training.data import RunDataModule

    dm = RunDataModule(RunConfig(method="ce", data="digits", batch_size=64).resolve())
    x, y = next(iter(dm.train_dataloader()))
    assert x.is_cuda and y.is_cuda and x.shape == (64, 1, 8, 8)
    ref = dm.train_split.images.index_select(0, dm.train_dataloader().sampler.indices()[:64])
    assert torch.equal(x.cpu(), ref)  # the same batch as on the host
