"""Offline weight files for foreign backbones: read a safetensors file or a torch state dict, load it strictly.

Paper: none (library infrastructure).

Library choices:

* A weight file is read from disk only: ``*.safetensors`` with :func:`safetensors.torch.load_file`, anything else
  with ``torch.load(weights_only=True)`` (no pickled code runs). A checkpoint dict that wraps the weights under
  ``"state_dict"``, ``"model"`` or ``"module"`` is unwrapped, and a DDP ``module.`` prefix is stripped.
* timm checkpoints go through the architecture's own ``checkpoint_filter_fn`` when timm defines one (it resamples
  ViT position embeddings to the chosen ``img_size`` and converts foreign layouts, as ``timm.create_model`` does).
* The classifier's keys (``fc.*``, ``head.*``, ...) are dropped: the backbone has no classifier.
* A first convolution saved for another number of input channels (an RGB checkpoint for 1-channel images) is
  adapted with timm's ``adapt_input_conv`` (1 channel: the sum over RGB, which is exactly what the RGB network
  computes on a grey image repeated three times).
* Keys of layers added after the checkpoint was written (attention layers inserted into the residual blocks) may
  be absent and keep their initialisation; every other missing or unexpected key is a ``ValueError`` that names
  the keys and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights_file"]

_WRAPPER_KEYS = ("state_dict", "model", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict stored in ``path`` (safetensors, or a torch file read with ``weights_only``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained_path={str(path)!r} is not a file; pass a .safetensors or torch .pt/.pth file"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: object = load_file(str(p))
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(
                f"pretrained_path={str(path)!r} could not be read with torch.load(weights_only=True) ({err}); save "
                "the weights with torch.save(model.state_dict(), path) or as .safetensors"
            ) from err
    for _ in range(2):  # {"state_dict": {...}} or {"model": {"module": ...}}
        if isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
            if inner is not None:
                sd = inner
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"pretrained_path={str(path)!r} does not hold a state dict (a mapping of parameter names to tensors); "
            "save model.state_dict(), not the model object or an optimizer state"
        )
    out = {str(k): v for k, v in sd.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def timm_filter_fn(model: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    """timm's ``checkpoint_filter_fn`` for ``model``'s architecture module, if it defines one."""
    mod = sys.modules.get(type(model).__module__)
    fn = getattr(mod, "checkpoint_filter_fn", None)
    return fn if callable(fn) and type(model).__module__.startswith("timm.") else None


def _adapt_first_conv(model: nn.Module, sd: dict[str, torch.Tensor], first_conv: str | None) -> None:
    if not first_conv or f"{first_conv}.weight" not in sd:
        return
    try:
        conv = model.get_submodule(first_conv)
    except AttributeError:
        return
    w = sd[f"{first_conv}.weight"]
    want = getattr(conv, "in_channels", None)
    if not isinstance(conv, nn.Conv2d) or w.dim() != 4 or want is None or w.shape[1] * conv.groups == want:
        return
    from timm.models import adapt_input_conv

    sd[f"{first_conv}.weight"] = adapt_input_conv(want // conv.groups, w, base_chans=w.shape[1])


def _preview(keys: Iterable[str], k: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - k} more" if len(keys) > k else ""
    return ", ".join(keys[:k]) + more


def load_weights_file(
    model: nn.Module,
    path: str | Path,
    *,
    label: str,
    first_conv: str | None = None,
    head_prefixes: Iterable[str] = (),
    optional_prefixes: Iterable[str] = (),
    filter_fn: Callable[..., dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load the weight file ``path`` into ``model`` (strict up to the documented exceptions; see the module).

    Args:
        model: the headless model (its own key names, as in ``model.state_dict()``).
        label: how to name the model in errors (``"timm:resnet18"``).
        first_conv: dotted name of the input convolution, adapted when the file has another channel count.
        head_prefixes: key prefixes of the removed classifier (``"fc."``); such keys are dropped.
        optional_prefixes: key prefixes of layers added after the file was written; they may be missing.
        filter_fn: ``fn(state_dict, model) -> state_dict`` applied first (timm's ``checkpoint_filter_fn``).
    """
    sd = read_state_dict(path)
    if filter_fn is not None:
        sd = dict(filter_fn(sd, model))
    heads = tuple(head_prefixes)
    sd = {k: v for k, v in sd.items() if not k.startswith(heads)} if heads else sd
    _adapt_first_conv(model, sd, first_conv)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and own[k].shape != v.shape]
    optional = tuple(optional_prefixes)
    missing = [k for k in own if k not in sd and not (optional and k.startswith(optional))]
    unexpected = [k for k in sd if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({_preview(wrong, 3)})")
        raise ValueError(
            f"pretrained_path={str(path)!r} does not fit {label}: {'; '.join(parts)}. The file must hold the "
            f"state dict of this exact architecture (keys as in model.state_dict() of {label}, with or without its "
            "classifier); check the model name and its options (model_kwargs), or export the weights from the "
            "model they belong to"
        )
    model.load_state_dict(sd, strict=False)
