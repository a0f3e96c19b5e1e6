"""What a :class:`~batchmates.methods.base.Method` builds from its run settings: the backbone and the optimiser.

```python
from batchmates.methods.build import rebuilding_from_checkpoint, using_backbone
with using_backbone(my_timm_model):          # the API's `backbone=` (an nn.Module): the method wraps it
    model = method_cls(cfg, info)
with rebuilding_from_checkpoint():            # weights come from a checkpoint: pretrained_path is not read
    model = method_cls(cfg, info)
```

Paper: LARS (You et al. 2017, arXiv:1708.03888) and the linear scaling rule (Goyal et al. 2017,
arXiv:1706.02677) are described in :mod:`batchmates.optim`; nothing here is a method paper's.

Library choices:

* **Backbone names.** A batchmates name (``cnn``, ``resnet18``, ...) goes to
  :func:`~batchmates.models.create_backbone` with ``backbone_kwargs`` as constructor keywords. ``timm:NAME`` /
  ``torchvision:NAME`` goes to :func:`~batchmates.models.foreign.create_foreign_backbone` with ``backbone_kwargs``
  as ``model_kwargs`` and the offline weights of ``pretrained_path``; the run records the backbone it built
  (``backbone_spec``). A module given through :func:`using_backbone` is wrapped with
  :func:`~batchmates.models.foreign.from_module` (attention layers inserted into its residual blocks first).
* **Rebuilding** (:func:`rebuilding_from_checkpoint`: ``from_checkpoint``, ``eval``, ``resume``): the recorded
  spec is rebuilt without reading ``pretrained_path`` (the file may be gone; the checkpoint holds the weights).
* **A layer that does not fit** (``--attn-layer`` on a model without residual blocks, a size the model cannot run
  at) is a :class:`~batchmates.config.ConfigError` naming the setting.
* **Optimiser.** ``sgd`` (momentum), ``adamw`` or ``lars`` (timm's LARS) on :func:`batchmates.optim.make_param_groups`
  (no decay on biases, norm parameters and ``no_weight_decay()`` names; under LARS no trust-ratio adaptation for
  them either). ``lr_rule`` reads ``lr`` per 256 images (:func:`batchmates.optim.lr_scaled`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from batchmates.config import ConfigError, DataInfo, RunConfig

__all__ = ["build_run_backbone", "rebuilding_from_checkpoint", "using_backbone", "is_rebuilding", "given_backbone",
           "create_optimizer", "effective_lr", "MODULE_SOURCE"]

#: ``cfg.backbone`` of a run whose backbone was a user's module (``train(cfg, backbone=module)``).
MODULE_SOURCE = "module"

_REBUILDING: ContextVar[bool] = ContextVar("batchmates_rebuilding", default=False)
_GIVEN: ContextVar[nn.Module | None] = ContextVar("batchmates_given_backbone", default=None)


@contextlib.contextmanager
def rebuilding_from_checkpoint() -> Iterator[None]:
    """Methods built inside rebuild their backbone for weights loaded afterwards (``pretrained_path`` unread)."""
    token = _REBUILDING.set(True)
    try:
        yield
    finally:
        _REBUILDING.reset(token)


@contextlib.contextmanager
def using_backbone(module: nn.Module | None) -> Iterator[None]:
    """Methods built inside use ``module`` as their backbone (``None``: the run's ``backbone`` setting)."""
    if module is not None and not isinstance(module, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module (e.g. a timm or torchvision model); got "
                        f"{type(module).__name__}")
    token = _GIVEN.set(module)
    try:
        yield
    finally:
        _GIVEN.reset(token)


def is_rebuilding() -> bool:
    return _REBUILDING.get()


def given_backbone() -> nn.Module | None:
    return _GIVEN.get()


def _foreign_name(spec: Any) -> str | None:
    return f"{spec.get('source')}:{spec.get('name')}" if isinstance(spec, dict) else None


def _from_given(module: nn.Module, info: DataInfo, attn_layer: Any, kw: dict[str, Any]) -> nn.Module:
    from batchmates.models.foreign import from_module
    from batchmates.models.foreign_attn import insert_attn_layers

    if attn_layer not in (None, "none"):
        insert_attn_layers(module, attn_layer, placement=kw.get("attn_placement", "block"),
                           **(kw.get("attn_kwargs") or {}))
    return from_module(module, in_channels=info.in_channels, image_size=info.image_size)


def build_run_backbone(cfg: RunConfig, info: DataInfo, name: str, *, attn_layer: Any = "none",
                       **kw: Any) -> nn.Module:
    """The backbone ``name`` of a run (see the module docstring); ``kw``: more ``create_backbone`` keywords
    (``attn_placement``, ``attn_kwargs``, ``depth``, ``mixers``, ...) that a method adds."""
    from batchmates.models import create_backbone

    given = given_backbone()
    try:
        if given is not None:
            return _from_given(given, info, attn_layer, kw)
        if isinstance(name, str) and name.startswith(MODULE_SOURCE + ":"):
            raise ConfigError(f"backbone={name!r} was a module passed to train(..., backbone=MODULE); pass it again: "
                              "Method.from_checkpoint(run_dir, backbone=MODULE) (a fresh, untrained instance)")
        if not (isinstance(name, str) and ":" in name):
            return create_backbone(name, in_channels=info.in_channels, image_size=info.image_size,
                                   attn_layer=attn_layer, **{**cfg.backbone_kwargs, **kw})
        spec = cfg.backbone_spec
        if is_rebuilding() and _foreign_name(spec) == name:
            from batchmates.models.foreign import rebuild_backbone

            return rebuild_backbone(spec)
        pretrained = None if is_rebuilding() else cfg.pretrained_path
        return create_backbone(name, in_channels=info.in_channels, image_size=info.image_size, attn_layer=attn_layer,
                               pretrained_path=pretrained, model_kwargs=dict(cfg.backbone_kwargs), **kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        flags = "--backbone" + (" / --attn-layer" if attn_layer not in (None, "none") else "")
        raise ConfigError(f"backbone={name!r} with attn_layer={attn_layer!r} cannot be built: {err} ({flags})") from err


# ---------------------------------------------------------------------------------------------- optimiser
def effective_lr(cfg: RunConfig) -> float:
    """``cfg.lr``, scaled to the global batch by ``cfg.lr_rule`` (``lr`` per 256 images) unless the rule is none."""
    from batchmates.optim import lr_scaled

    rule = getattr(cfg, "lr_rule", "none")
    return float(cfg.lr) if rule == "none" else lr_scaled(float(cfg.lr), int(cfg.batch_size), rule)


def create_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The run's optimiser (``sgd``, ``adamw`` or ``lars``) on parameter ``groups`` at :func:`effective_lr`."""
    lr = effective_lr(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.optimizer == "lars":
        from batchmates.optim import create_lars

        return create_lars(groups, lr=lr, momentum=cfg.momentum, weight_decay=float(cfg.weight_decay))
    raise ConfigError(f"optimizer={cfg.optimizer!r}: choose 'sgd', 'adamw' or 'lars' (--optimizer)")
