"""Checks made before a run starts: every bad input is one clear error (naming the input and the fix), raised
before any data is loaded or anything is written.

Paper: none (library infrastructure).

Library choices:

* :func:`check_config_file`: ``--config`` must be a readable YAML file of known settings with values of the
  right type (``weight_decay: abc`` and ``epochs: true`` are refused, not coerced).
* :func:`check_out_dir`: ``--out`` must be a directory or not exist yet, not under a file, and writable (tried by
  creating and removing a probe file in the nearest existing directory, which also catches read-only mounts and
  works for root, for whom permission bits do not apply).
* :func:`check_device` / :func:`check_run_settings`: an accelerator that is not there (``--accelerator gpu``,
  ``eval --device cuda`` without CUDA), ``16-mixed`` precision without a GPU (Lightning would silently run
  ``bf16-mixed``), and more devices than the accelerator has are refused.
* :func:`check_checkpoint_file`: ``last.ckpt`` must be a complete, uncorrupted checkpoint: non-empty, a readable
  zip archive (a truncated file has no central directory) whose members pass their CRC-32 checks (a flipped bit
  otherwise loads silently with ``torch.load``).
* :func:`check_cli_train`, :func:`check_cli_compare`, :func:`check_resume_dir` and :func:`check_run_dir` are what
  the CLI runs before it imports the heavy stack (torch, Lightning) or loads data: settings and their types, the
  method, option, dataset, backbone and attention-layer names (from the registry snapshot of
  :mod:`batchmates.training.catalog`), paths and checkpoints. Only :func:`check_run_settings`,
  :func:`check_device` and :func:`gpu_count` import torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from batchmates.config import ConfigError, RunConfig, RunError

__all__ = ["check_config_file", "check_out_dir", "check_device", "check_run_settings", "check_checkpoint_file",
           "gpu_count", "check_cli_train", "check_cli_compare", "check_resume_dir", "check_run_dir"]


def check_config_file(path: str) -> RunConfig:
    """Load and validate ``--config PATH``; :class:`ConfigError` names the file and what is wrong."""
    if os.path.isdir(path):
        raise ConfigError(f"--config {path!r} is a directory; pass its config.yaml, e.g. --config "
                          f"{os.path.join(path, 'config.yaml')}")
    if not os.path.exists(path):
        raise ConfigError(f"--config {path!r} does not exist; pass the config.yaml of an earlier run")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path!r} cannot be read ({e}); pass a readable YAML file") from None
    if not text.strip():
        raise ConfigError(f"--config {path!r} is empty; pass the config.yaml of an earlier run")
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r} is not valid YAML ({' '.join(str(e).split())}); fix the file") from None
    try:
        return RunConfig.from_dict(data).validate()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"--config {path!r}: {e}") from None


def check_out_dir(path: str, *, flag: str = "--out") -> None:
    """``path`` can be (or already is) a writable run directory; :class:`ConfigError` otherwise."""
    if not path:
        raise ConfigError(f"{flag} is empty; pass a directory for the run's files")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; choose a directory path")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path!r} lies under the file {parent!r}; choose a directory path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".batchmates-write-test-", dir=parent)
    except OSError as e:
        raise ConfigError(f"{flag} {path!r}: cannot write in {parent!r} ({e.strerror or e}); choose a writable "
                          "directory") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def gpu_count() -> int:
    """CUDA devices visible to torch (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str, *, flag: str = "--device") -> None:
    """``device`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) exists here; :class:`ConfigError` otherwise."""
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return
    if kind == "cuda":
        n = gpu_count()
        if n == 0:
            raise ConfigError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
        if index and (not index.isdigit() or int(index) >= n):
            raise ConfigError(f"{flag} {device}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return
    if kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{flag} mps: Apple's MPS is not available on this machine; use {flag} cpu")
        return
    raise ConfigError(f"{flag} {device!r}: unknown device; use cpu, cuda, cuda:N or mps")


def check_run_settings(cfg: RunConfig) -> None:
    """The output directory, accelerator, device count and precision of a resolved ``cfg`` can run here."""
    check_out_dir(cfg.out)
    acc = cfg.accelerator
    if acc in ("gpu", "cuda"):
        n = gpu_count()
        if n == 0:
            raise ConfigError(f"--accelerator {acc}: no CUDA GPU is available on this machine; use --accelerator cpu "
                              "(or auto)")
        if cfg.devices > n:
            raise ConfigError(f"--devices {cfg.devices}: this machine has {n} CUDA GPU(s); pass --devices {n} or "
                              "fewer")
    elif acc == "mps":
        check_device("mps", flag="--accelerator")
    on_gpu = acc in ("gpu", "cuda") or (acc == "auto" and gpu_count() > 0)
    if cfg.precision == "16-mixed" and not on_gpu:
        raise ConfigError("--precision 16-mixed needs a CUDA GPU (on the CPU Lightning would run bf16-mixed instead); "
                          "use --precision bf16-mixed or 32-true")


def check_checkpoint_file(path: str) -> None:
    """``path`` is a complete checkpoint (:func:`batchmates.io.verify_checkpoint`)."""
    from batchmates.io import verify_checkpoint

    verify_checkpoint(path)


# ---------------------------------------------------------------------------------------------- the CLI's checks
def check_cli_train(cfg: RunConfig, *, overwrite: bool = False) -> None:
    """Everything about a ``batchmates train`` config that can be checked without Lightning or the data (the
    device checks import torch, last)."""
    from batchmates.config import CKPT_FILE
    from batchmates.training.catalog import check_names

    cfg.validate()
    check_names(cfg.method, cfg.options, cfg.data, cfg.backbone, cfg.attn_layer)
    check_out_dir(cfg.out)
    if not overwrite and os.path.exists(os.path.join(cfg.out, CKPT_FILE)):
        raise RunError(f"{cfg.out!r} already holds a run ({CKPT_FILE}); continue it with `batchmates train --resume "
                       f"{cfg.out}`, choose another --out, or pass --overwrite")
    check_run_settings(cfg)


def check_cli_compare(variants: object, data: str, method_options: dict[str, dict[str, str]], out: str) -> None:
    """The variants' methods and options, the dataset and ``--out`` of ``batchmates compare``, without torch."""
    from batchmates.training.catalog import check_data, check_options
    from batchmates.training.variants import Variant, parse_variant

    check_data(data)
    specs: list[object] = []
    if isinstance(variants, str) and variants.strip() != "all":
        specs = [v.strip() for v in variants.split(",") if v.strip()]
    elif isinstance(variants, list | tuple):
        specs = list(variants)
    parsed = [v if isinstance(v, Variant) else parse_variant(str(v)) for v in specs]
    for v in parsed:
        try:
            check_options(v.method, {**method_options.get(v.method, {}), **v.options})
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r}: {e}") from None
    compared = {v.method for v in parsed}
    for method, opts in method_options.items():
        if parsed and method not in compared:
            raise ConfigError(f"--opt {method}.*: method {method!r} is not compared ({sorted(compared)})")
        check_options(method, opts)
    check_out_dir(out)


def check_resume_dir(run_dir: str, *, reevaluate: bool = False) -> str:
    """``--resume DIR`` holds a run: its config and a complete checkpoint (or it finished). Returns what to tell
    the user when the run finished and is left alone (not ``reevaluate``), else ``""``."""
    from batchmates.config import CKPT_FILE, CONFIG_FILE

    check_run_dir(run_dir, flag="--resume", need_checkpoint=False)
    cfg_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise RunError(f"--resume {run_dir!r}: no {CONFIG_FILE} there; is it a batchmates run directory?")
    check_config_file(cfg_path)
    if not os.path.exists(os.path.join(run_dir, CKPT_FILE)):
        raise RunError(f"--resume {run_dir!r}: no {CKPT_FILE} yet (the run stopped before its first checkpoint); "
                       "start it again without --resume")
    from batchmates.training.rundir import finished_notice, is_finished

    if is_finished(run_dir) and not reevaluate:  # left alone, so its checkpoint is not needed
        return finished_notice(run_dir)
    check_checkpoint_file(os.path.join(run_dir, CKPT_FILE))
    return ""


def check_run_dir(run_dir: str, *, flag: str = "DIR", need_checkpoint: bool = True) -> None:
    """``run_dir`` is a directory written by ``batchmates train`` (with a complete ``last.ckpt``)."""
    from batchmates.config import CKPT_FILE

    if not os.path.exists(run_dir):
        raise RunError(f"{flag} {run_dir!r} does not exist; pass the --out directory of a `batchmates train` run")
    if not os.path.isdir(run_dir):
        raise RunError(f"{flag} {run_dir!r} is a file; pass the --out directory of a `batchmates train` run")
    ckpt = os.path.join(run_dir, CKPT_FILE)
    if need_checkpoint:
        if not os.path.exists(ckpt):
            raise RunError(f"{flag} {run_dir!r} has no {CKPT_FILE}; pass a directory written by `batchmates train`")
        check_checkpoint_file(ckpt)
