"""``ibaformer``: a Vision Transformer whose chosen blocks mix tokens with intra-batch attention, MIBA or EIBA
(IBAFormer, Sun et al. 2023, arXiv:2309.06282), trained with cross-entropy.

Paper: in the chosen transformer blocks, the queries of a sample also attend to the other images of the batch
(MIBA: to the batch-mean keys/values; EIBA: the average of its attention to every sample), to diversify the
context seen in training and generalise across domains (SegFormer, GTAV -> Cityscapes/BDD/Mapillary). At test
time each image is processed on its own. See :class:`batchmates.nn.IntraBatchAttention`.

Library choices:

* Backbone ``vit-tiny`` (the only transformer backbone); the blocks listed in ``iba_blocks`` use the ``"miba"``
  (``mode=mean``) or ``"eiba"`` (``mode=element``) token mixer, the rest plain self-attention. ``iba_blocks``:
  ``all``, ``none`` (the plain self-attention ViT, i.e. the baseline with the very same budget), ``lastK`` /
  ``firstK`` (e.g. ``last2``, the default) or comma-separated block indices (``0,2``; negative counts from the
  end).
* Per-dataset defaults for a small ViT on CPU: AdamW, lr 1e-3, weight decay 0.05, short warm-up.
* Domain-shift evaluation: the trainer's corruption protocol (``batchmates eval DIR --corruptions`` or
  ``compare --corruptions``) on deterministic corrupted test sets, with ``eval_mode="independent"`` (each test
  image on its own) unless ``--eval-mode batch``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import nn

from batchmates.config import ConfigError, Option
from batchmates.methods.ce import CrossEntropy
from batchmates.methods.registry import register_method

__all__ = ["IBAFormerMethod", "parse_iba_blocks"]

_MIXER = {"mean": "miba", "element": "eiba"}


def parse_iba_blocks(spec: str, depth: int) -> list[int]:
    """Block indices (sorted, unique, in ``[0, depth)``) selected by ``spec``: ``all``, ``none``, ``lastK``,
    ``firstK`` or comma-separated indices (negative ones count from the end). Raises :class:`ConfigError`."""
    s = str(spec).strip().lower().replace(" ", "")
    hint = "use all, none, lastK, firstK (e.g. last2) or block indices such as 0,2"
    if s == "all":
        return list(range(depth))
    if s == "none":
        return []
    for prefix in ("last", "first"):
        if s.startswith(prefix):
            k_str = s[len(prefix):]
            if not k_str.isdigit() or not 1 <= int(k_str) <= depth:
                raise ConfigError(f"option iba_blocks={spec!r}: {prefix}K needs 1 <= K <= depth={depth}; {hint}")
            k = int(k_str)
            return list(range(depth - k, depth)) if prefix == "last" else list(range(k))
    out = set()
    for part in s.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ConfigError(f"option iba_blocks={spec!r}: {part!r} is not a block index; {hint}") from None
        if not -depth <= i < depth:
            raise ConfigError(f"option iba_blocks={spec!r}: block {i} is outside the {depth} blocks "
                              f"(0..{depth - 1}, or -{depth}..-1); {hint}")
        out.add(i % depth)
    return sorted(out)


@register_method("ibaformer")
class IBAFormerMethod(CrossEntropy):
    """ViT with intra-batch attention (MIBA/EIBA) in chosen blocks, CE classifier (arXiv:2309.06282)."""

    supervised = True
    batch_relational = True
    options: ClassVar[dict[str, Option]] = {
        **CrossEntropy.options,
        "mode": Option(str, "mean", "intra-batch attention: mean (MIBA, batch-mean keys/values) or element (EIBA, "
                       "average attention over every sample)", choices=("mean", "element")),
        "iba_blocks": Option(str, "last2", "blocks with intra-batch attention: all, none (plain ViT baseline), "
                             "lastK, firstK or indices like 0,2"),
        "chunk_size": Option(int, 0, "EIBA query-key sample pairs per chunk (0: automatic)", minimum=0),
    }

    @classmethod
    def default_settings(cls, data: str) -> dict[str, Any]:
        d = super().default_settings(data)
        d.update(backbone="vit-tiny", optimizer="adamw", lr=1e-3, weight_decay=0.05)
        if data == "digits":
            d.update(epochs=2, warmup_epochs=0.2)
        return d

    @classmethod
    def parse_options(cls, raw: dict[str, Any] | None) -> dict[str, Any]:
        opts = super().parse_options(raw)
        parse_iba_blocks(opts["iba_blocks"], 10**6)  # format check now; the range is checked against the ViT depth
        return opts

    def build_backbone(self) -> nn.Module:
        from batchmates.models import create_backbone
        from batchmates.models.vit import VisionTransformer

        if self.cfg.backbone != "vit-tiny":
            raise ConfigError(f"method 'ibaformer' needs --backbone vit-tiny (a transformer), got "
                              f"{self.cfg.backbone!r}")
        if self.cfg.attn_layer not in (None, "none"):
            raise ConfigError(f"method 'ibaformer' uses token mixers, not --attn-layer {self.cfg.attn_layer}; "
                              "drop --attn-layer")
        depth = int(inspect.signature(VisionTransformer).parameters["depth"].default)  # vit-tiny's depth
        self.iba_block_ids = parse_iba_blocks(self.opts["iba_blocks"], depth)
        mixer = _MIXER[self.opts["mode"]]
        mixers = [mixer if i in self.iba_block_ids else "self" for i in range(depth)]
        kw: dict[str, Any] = {"eval_mode": self.cfg.eval_mode}
        if self.opts["chunk_size"] > 0:
            kw["chunk_size"] = self.opts["chunk_size"]
        return create_backbone(
            "vit-tiny",
            in_channels=self.info.in_channels,
            image_size=self.info.image_size,
            depth=depth,
            mixers=mixers,
            mixer_kwargs={mixer: kw} if self.iba_block_ids else None,
        )
