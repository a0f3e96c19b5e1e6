"""Training and evaluation on Lightning: ``train``/``resume`` a run, ``evaluate`` it, ``compare`` variants.

Submodules: ``run`` (train/resume), ``data`` (the LightningDataModule: loaders, label noise, DataInfo),
``callbacks`` (history, throughput, per-step seeding), ``rundir`` (the run directory: file names, ``load_run``),
``evaluate`` (accuracy, kNN, linear probe, corruptions), ``compare`` and ``variants`` (named variants x seeds),
``plots``, ``checkpoint_io`` (atomic checkpoints). ``config`` and ``io`` re-export :mod:`batchmates.config` and
:mod:`batchmates.io` for older imports.

Paper: none (library infrastructure).

Library choices: Lightning is imported only when training starts (``import batchmates.training`` stays light).
"""

from batchmates.config import ConfigError, Option, RunConfig

__all__ = ["RunConfig", "Option", "ConfigError", "train", "resume", "evaluate", "compare"]


def __getattr__(name: str):  # lazy: keep `import batchmates.training` free of Lightning
    if name in ("train", "resume"):
        from batchmates.training import run

        return getattr(run, name)
    if name == "evaluate":
        from batchmates.training.evaluate import evaluate

        return evaluate
    if name == "compare":
        from batchmates.training.compare import compare

        return compare
    raise AttributeError(name)
