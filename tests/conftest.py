"""Shared pytest fixtures."""

from __future__ import annotations

import pytest
import torch.distributed

from batchmates.testing import ddp_contract as _ddp_contract


@pytest.fixture
def ddp_contract():
    """:func:`batchmates.testing.ddp_contract`: METHODS.md's global-batch contract on 2 gloo ranks (uneven shards).

    Skips where this torch build has no gloo backend.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    return _ddp_contract
