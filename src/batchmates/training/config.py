"""Run configuration; moved to :mod:`batchmates.config` (the bottom floor), re-exported here for old imports.

Paper: none (library infrastructure).

Library choices: importing this module also imports :mod:`batchmates.methods`, so ``RunConfig.resolve()`` finds
the method classes by name, as it always did from here; new code imports :mod:`batchmates.config`.
"""

from batchmates.config import (
    ACCELERATORS,
    CKPT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    OPTIMIZERS,
    PRECISIONS,
    PROTOCOLS,
    STRATEGIES,
    ConfigError,
    DataInfo,
    Option,
    RunConfig,
    RunError,
    Setting,
    parse_opt_assignments,
)

import batchmates.methods  # noqa: E402,F401  isort: skip  (installs the method look-up of RunConfig.resolve)

__all__ = ["Option", "RunConfig", "ConfigError", "RunError", "DataInfo", "Setting", "parse_opt_assignments",
           "PRECISIONS", "OPTIMIZERS", "STRATEGIES", "ACCELERATORS", "PROTOCOLS", "CONFIG_FILE", "METRICS_FILE",
           "CKPT_FILE"]
