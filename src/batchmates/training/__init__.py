"""Training and evaluation on Lightning: ``train``/``resume`` a run, ``evaluate`` it, ``compare`` methods.

Submodules: ``config`` (RunConfig, Option), ``run`` (train/resume), ``evaluate`` (accuracy, kNN, linear probe,
corruptions), ``compare``, ``io`` (atomic writes), ``plots``. Lightning is imported only when training starts.
"""

from batchmates.training.config import ConfigError, Option, RunConfig

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
