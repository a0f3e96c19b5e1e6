"""Foreign backbones: timm and torchvision models, or any ``nn.Module``, as batchmates :class:`Backbone` s.

```python
from batchmates.models import create_backbone
from batchmates.models.foreign import create_foreign_backbone, from_module
net = create_backbone("timm:resnet18", in_channels=1, image_size=28, attn_layer="se")
net = create_foreign_backbone("torchvision:resnet18", in_channels=3, image_size=64,
                              pretrained_path="resnet18.safetensors", attn_layer="ba2m")
net = from_module(my_model, in_channels=3, image_size=32)
feats, maps = net(x), net.forward_stages(x)     # [N, D]; one [N, C_s, H_s, W_s] per stage
net.spec                                        # how to rebuild it: {"source", "name", "in_channels", ...}
```

Paper: none (an adapter; no method paper is involved).

Library choices:

* **Features** (``forward``): the model's own pooled, pre-classifier output, exactly what the original model
  computes without its classifier (timm ``num_classes=0`` / ``reset_classifier(0)``; torchvision: the final
  ``Linear`` replaced by ``nn.Identity``). ``feature_dim`` and the stage widths are read from one dummy forward.
* **Stages** (``forward_stages``, used by ``btn``): timm models with ``forward_intermediates`` give one
  ``[N, C, H, W]`` map per entry of their ``feature_info`` (ResNets: the stem and ``layer1``..``layer4``; ViTs:
  every block as a patch grid); torchvision ResNets run stage by stage and give the same five maps (the stem
  before its max-pool, then ``layer1``..``layer4``, as timm's ``feature_info``); other
  models with a ``features`` Sequential (MobileNet, EfficientNet, VGG, ConvNeXt, ...) give the last output of
  every resolution; any model can name the submodules whose outputs are the stages (``stage_modules``), read
  with forward hooks; otherwise the only stage is the output itself.
* **Input channels**: timm builds the model with ``in_chans``; for torchvision and ``from_module`` the first
  ``Conv2d`` is replaced by one with ``in_channels`` inputs (same kernel, stride, padding; key name unchanged).
  Replacing the convolution, rather than repeating a grey channel three times at the input, costs nothing per
  image, and an RGB checkpoint is loaded into it by summing its RGB filters, which computes exactly what the
  RGB network computes on a repeated grey image.
* **Small images**: the architecture is never changed behind the user's back (no CIFAR stem swap): a
  torchvision/timm ResNet-18 on 28 px images ends on a 1x1 map. timm models that take ``img_size`` (ViTs) are
  built for ``image_size``; a model that cannot run at that size fails at construction with the size named.
  For a CIFAR-style stem, change the model and pass it to :func:`from_module`.
* **Pretrained weights** (``pretrained_path``): a local safetensors file or torch state dict, loaded offline
  (:mod:`batchmates.models.foreign_weights`); nothing is ever downloaded (``pretrained=False`` / ``weights=None``).
* **Attention layers** (``attn_layer``): inserted into the residual blocks of timm/torchvision ResNets
  (:mod:`batchmates.models.foreign_attn`) after the weights are loaded, so a plain checkpoint loads and the new
  layers start from their own initialisation (a file that holds them loads them too).
* Convolution weights and inputs are channels-last, as in batchmates' own convolutional backbones (CPU speed).
* Convolutions whose input is smaller than their stride (a ResNet's stride-2 3x3 on a 1x1 map, at 8-16 px) run in
  float32 under CPU autocast (``fp32_convs`` names them): CPU bf16 computes their weight gradients wrongly
  (:mod:`batchmates.models.conv_guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from batchmates.models.conv_guard import guard_small_input_convs
from batchmates.models.foreign_attn import insert_attn_layers
from batchmates.models.foreign_weights import load_weights_file, timm_filter_fn
from batchmates.models.layers import Backbone

__all__ = ["ForeignBackbone", "create_foreign_backbone", "from_module", "rebuild_backbone", "parse_spec", "SOURCES"]

SOURCES: tuple[str, ...] = ("timm", "torchvision")
_SPEC_HINT = "use 'timm:NAME' (e.g. timm:resnet18) or 'torchvision:NAME' (e.g. torchvision:resnet18)"


def parse_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; raises ``ValueError`` naming the accepted forms."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"backbone={spec!r} is not a foreign backbone name; {_SPEC_HINT}")
    source, name = spec.split(":")
    if source not in SOURCES or not name:
        raise ValueError(f"backbone={spec!r}: unknown source {source!r} or empty model name; {_SPEC_HINT}")
    return source, name


# ---------------------------------------------------------------------------------------------- stage readers
def _timm_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return list(model.forward_intermediates(x, intermediates_only=True))


def _torchvision_resnet_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.relu(model.bn1(model.conv1(x)))
    out = [x]
    x = model.maxpool(x)
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        out.append(x)
    return out


def _per_resolution_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for child in model.features:
        x = child(x)
        outs.append(x)
    keep = [o for o, nxt in zip(outs, outs[1:]) if o.shape[-2:] != nxt.shape[-2:]]
    return keep + [outs[-1]]


class _HookStages:
    """Stage reader for any model: the outputs of named submodules during one forward, caught by hooks."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def __call__(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        caught: dict[str, torch.Tensor] = {}
        handles = [
            model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: caught.__setitem__(n, o))
            for n in self.names
        ]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
        return [caught[n] for n in self.names]


def _output_stage(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    y = model(x)
    return [y[:, :, None, None] if y.dim() == 2 else y]


# ---------------------------------------------------------------------------------------------- the adapter
class ForeignBackbone(Backbone):
    """A timm/torchvision model (or any module) behind the :class:`Backbone` interface.

    ``self.model`` is the original model without its classifier: its ``state_dict()`` has the original key
    names (what :func:`batchmates.export.export_backbone` writes). See the module docstring for the choices.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        in_channels: int,
        image_size: int,
        stages: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]],
        spec: dict[str, Any],
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self._stages = stages
        self.spec = dict(spec)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        feats, maps = self._probe()
        self.feature_dim = int(feats.shape[1])
        self.stage_dims = [int(m.shape[1] if m.dim() == 4 else m.shape[-1]) for m in maps]
        self.stage_kinds = ["map" if m.dim() == 4 else "tokens" for m in maps]

    def _probe(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ref = next(self.model.parameters(), None)
        x = torch.zeros(1, self.in_channels, self.image_size, self.image_size,
                        device=ref.device if ref is not None else None,
                        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                feats, maps = self(x), self.forward_stages(x)
        except Exception as err:  # noqa: BLE001 - re-raised with the size and the fix
            raise ValueError(
                f"backbone {self.spec.get('source')}:{self.spec.get('name')} cannot run on {self.in_channels}-channel "
                f"{self.image_size}px images ({type(err).__name__}: {err}); use a larger image_size (--image-size) "
                "or a model built for this input"
            ) from err
        finally:
            self.train(was)
        # convolutions on inputs smaller than their stride: wrong weight gradients under CPU bf16 autocast
        self.fp32_convs = guard_small_input_convs(self.model, self._prepare(x))
        if feats.dim() != 2:
            raise ValueError(
                f"backbone {self.spec.get('name')!r} returns features of shape {tuple(feats.shape)}, not [N, D]; "
                "pool them in the model (or pass a model whose forward ends with pooling)"
            )
        return feats, maps

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.in_channels)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's pooled pre-classifier features ``[N, feature_dim]``."""
        y = self.model(self._prepare(x))
        return y.mean(dim=(2, 3)) if y.dim() == 4 else y

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map per stage: ``[N, C_s, H_s, W_s]`` (or ``[N, T, D]`` where the model yields tokens)."""
        return self._stages(self.model, self._prepare(x))

    def pool(self, last: torch.Tensor) -> torch.Tensor:
        return last.mean(dim=(2, 3)) if last.dim() == 4 else last.mean(dim=1)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, feature_dim={self.feature_dim}"


# ---------------------------------------------------------------------------------------------- builders
def _check_geometry(in_channels: Any, image_size: Any) -> None:
    for arg, v in (("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")


def _first_conv_name(model: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _set_in_channels(model: nn.Module, in_channels: int) -> str | None:
    """Replace the first Conv2d by one with ``in_channels`` inputs (if it differs); return its name."""
    name = _first_conv_name(model)
    if name is None:
        return None
    conv = model.get_submodule(name)
    if conv.in_channels != in_channels:
        if conv.groups != 1:
            raise ValueError(f"in_channels={in_channels}: the first convolution {name!r} is grouped; cannot adapt it")
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                        device=conv.weight.device, dtype=conv.weight.dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return name


def _remove_torchvision_head(model: nn.Module) -> list[str]:
    """Replace the classifier's final Linear by Identity; return the key prefixes of the removed layer."""
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return [f"{attr}."]
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            last = list(head._modules)[-1]
            head._modules[last] = nn.Identity()
            return [f"{attr}.{last}."]
    return []


def _build_timm(name: str, in_channels: int, image_size: int, model_kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"backbone='timm:{name}': timm has no model {name!r}; list them with timm.list_models('*{name}*')"
        )
    kw = {"pretrained": False, "num_classes": 0, "in_chans": in_channels, **model_kwargs}
    try:
        return timm.create_model(name, img_size=image_size, **kw)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, **kw)


def _build_torchvision(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(
            f"backbone='torchvision:{name}': torchvision has no model {name!r}; see torchvision.models.list_models()"
        )
    return torchvision.models.get_model(name, weights=None, **model_kwargs)


def _stage_reader(model: nn.Module, source: str, stage_modules: Sequence[str] | None) -> Callable:
    if stage_modules:
        for n in stage_modules:
            model.get_submodule(n)  # raises AttributeError naming the missing submodule
        return _HookStages(stage_modules)
    if source == "timm" and hasattr(model, "forward_intermediates"):
        return _timm_stages
    if all(hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4")):
        return _torchvision_resnet_stages
    if isinstance(getattr(model, "features", None), nn.Sequential):
        return _per_resolution_stages
    return _output_stage


def _attn_spec(layer: Any) -> Any:
    if layer is None or isinstance(layer, str):
        return layer
    return f"{layer.__module__}:{layer.__qualname__}"


def create_foreign_backbone(
    spec: str,
    *,
    in_channels: int,
    image_size: int,
    pretrained_path: str | None = None,
    attn_layer: str | Callable[..., nn.Module] | None = None,
    attn_kwargs: dict[str, Any] | None = None,
    attn_placement: str = "block",
    model_kwargs: dict[str, Any] | None = None,
    stage_modules: Sequence[str] | None = None,
    channels_last: bool = True,
) -> ForeignBackbone:
    """Build ``"timm:NAME"`` or ``"torchvision:NAME"`` without its classifier, as a :class:`ForeignBackbone`.

    Args:
        spec: ``"timm:NAME"`` or ``"torchvision:NAME"``.
        in_channels, image_size: input geometry (see the module docstring for how each source handles them).
        pretrained_path: a local ``.safetensors`` file or torch state dict of the model (offline).
        attn_layer: ``"se"``, ``"ba2m"`` (any registered name) or a layer class, inserted into every residual
            block of a ResNet-family model; ``None``/``"none"``: no layer.
        attn_kwargs: options of the attention layer; attn_placement: ``"block"`` or ``"stage"``.
        model_kwargs: extra keywords for ``timm.create_model`` / ``torchvision.models.get_model``
            (e.g. ``patch_size``, ``depth``, ``drop_path_rate``).
        stage_modules: names of the submodules whose outputs are the stages (default: see the module docstring).
        channels_last: run convolutions channels-last (default True).
    """
    source, name = parse_spec(spec)
    _check_geometry(in_channels, image_size)
    model_kwargs = dict(model_kwargs or {})
    head_prefixes: list[str] = []
    if source == "timm":
        model = _build_timm(name, in_channels, image_size, model_kwargs)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        first_conv = cfg.get("first_conv") if isinstance(cfg.get("first_conv"), str) else _first_conv_name(model)
        classifier = cfg.get("classifier")
        head_prefixes = [f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier or [])]
        filter_fn = timm_filter_fn(model)
    else:
        model = _build_torchvision(name, model_kwargs)
        head_prefixes = _remove_torchvision_head(model)
        first_conv = _set_in_channels(model, in_channels)
        filter_fn = None
    inserted: list[nn.Module] = []
    if attn_layer is not None and attn_layer != "none":
        inserted = insert_attn_layers(model, attn_layer, placement=attn_placement, **(attn_kwargs or {}))
    if pretrained_path is not None:
        optional = [f"{n}." for n, m in model.named_modules() if any(m is i for i in inserted)]
        load_weights_file(model, pretrained_path, label=spec, first_conv=first_conv, head_prefixes=head_prefixes,
                          optional_prefixes=optional, filter_fn=filter_fn)
    record = {
        "source": source, "name": name, "in_channels": int(in_channels), "image_size": int(image_size),
        "attn_layer": _attn_spec(attn_layer) if attn_layer != "none" else None,
        "attn_kwargs": dict(attn_kwargs or {}), "attn_placement": attn_placement, "model_kwargs": model_kwargs,
        "stage_modules": list(stage_modules) if stage_modules else None,
    }
    return ForeignBackbone(model, in_channels=in_channels, image_size=image_size,
                           stages=_stage_reader(model, source, stage_modules), spec=record,
                           channels_last=channels_last)


def rebuild_backbone(spec: dict[str, Any], *, pretrained_path: str | None = None) -> ForeignBackbone:
    """Rebuild a backbone from its ``.spec`` (as a run records it); weights from ``pretrained_path`` if given."""
    if not isinstance(spec, dict) or spec.get("source") not in SOURCES:
        raise ValueError(f"spec must be a ForeignBackbone.spec dict with source in {SOURCES}; got {spec!r}")
    layer = spec.get("attn_layer")
    if isinstance(layer, str) and ":" in layer:
        import importlib

        mod, _, qual = layer.partition(":")
        layer = importlib.import_module(mod)
        for part in qual.split("."):
            layer = getattr(layer, part)
    kw = {k: spec[k] for k in ("attn_kwargs", "attn_placement", "model_kwargs", "stage_modules") if k in spec}
    return create_foreign_backbone(f"{spec['source']}:{spec['name']}", in_channels=spec["in_channels"],
                                   image_size=spec["image_size"], pretrained_path=pretrained_path,
                                   attn_layer=layer, **kw)


def from_module(
    module: nn.Module,
    *,
    in_channels: int | None = None,
    image_size: int = 224,
    stage_modules: Sequence[str] | None = None,
    channels_last: bool = True,
) -> Backbone:
    """Wrap a user's model (a timm or torchvision model, or any ``nn.Module`` mapping images to features).

    The module is taken over, not copied: a timm classifier is reset (``reset_classifier(0)``), a torchvision-style
    final ``Linear`` (``fc``, ``classifier``, ``heads``, ``head``) becomes ``nn.Identity``, and a first ``Conv2d``
    with another input count is replaced (``in_channels``; default: that convolution's own). A batchmates
    :class:`Backbone` is returned as it is. ``image_size`` is the size the dummy forward runs at.
    """
    if isinstance(module, Backbone):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module expects a torch.nn.Module; got {type(module).__name__}")
    is_timm = type(module).__module__.startswith("timm.")
    if is_timm and getattr(module, "num_classes", 0) and hasattr(module, "reset_classifier"):
        module.reset_classifier(0)
    elif not is_timm:
        _remove_torchvision_head(module)
    first = _first_conv_name(module)
    if in_channels is None:
        in_channels = module.get_submodule(first).in_channels if first is not None else 3
    _check_geometry(in_channels, image_size)
    if first is not None:
        _set_in_channels(module, int(in_channels))
    spec = {"source": "module", "name": f"{type(module).__module__}:{type(module).__qualname__}",
            "in_channels": int(in_channels), "image_size": int(image_size)}
    return ForeignBackbone(module, in_channels=int(in_channels), image_size=int(image_size),
                           stages=_stage_reader(module, "timm" if is_timm else "module", stage_modules), spec=spec,
                           channels_last=channels_last)
