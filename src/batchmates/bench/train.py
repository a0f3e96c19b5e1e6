"""`batchmates bench train`: images/s of the whole training step, against a bare PyTorch loop in the same process.

Paper: none (engine measurements; no paper states these figures).

Library choices (what is measured, and how):

* **Framework overhead.** The real ``batchmates train`` step (the Lightning loop built by the trainer, with the
  run's callbacks: history, per-step seeding, throughput, checkpoints) of ``ce`` on ``resnet-small`` next to a
  bare PyTorch loop with the same backbone, batch, augmentation, precision, optimiser and schedule. Both run in
  one process, interleaved: after every block of ``block`` Lightning steps a callback runs ``block`` bare steps,
  so load from other processes hits both alike. A Lightning step is the wall time between two batch starts
  (loading, augmentation, forward, backward, optimiser, scheduler, logging, callbacks), minus the bare blocks run
  in between. Reported per block (median over blocks); the target is an overhead of at most
  :data:`TARGET_OVERHEAD` (10%).
* **Where the rest goes.** Inside the same Lightning run the bench times ``Method.log_train`` and every callback
  hook of the trainer's own callbacks (their share of the step), and separately the per-step reseeding
  (``seed_step``) and the augmentation of one batch (plain-torch :class:`~batchmates.data.augment.PadCropFlip`
  against kornia's ``RandomCrop`` + ``RandomHorizontalFlip``).
* **Speed-ups of the bare step**, each pair timed in alternating blocks (ABBA) in one process: augmentation path
  (torch vs kornia), bf16 autocast vs fp32 (where the CPU has native bf16 or on CUDA), ``torch.compile`` of the
  backbone vs eager (compile time reported separately; not in ``quick``).

``quick=True``: digits, the ``cnn`` backbone, a few steps (a smoke run for the tests). The full run uses
Fashion-MNIST when its files are present (else digits) at the dataset's default batch size.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from batchmates.bench.common import BenchRow

BENCHMARK = "train"
TARGET_OVERHEAD = 0.10

__all__ = ["run", "summary", "TARGET_OVERHEAD", "BareLoop", "native_bf16"]


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively here (CUDA with bf16, or a CPU with AVX512-BF16 / AMX-BF16)."""
    from batchmates.config import native_bf16 as _native

    return _native(device.type)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The hand-written loop the trainer is compared with: aug -> forward (autocast) -> CE -> SGD -> LR step."""

    def __init__(self, model: Any, loader: Any, augment: Callable[[torch.Tensor], torch.Tensor], *, bf16: bool,
                 device: torch.device, compiled: bool = False) -> None:
        self.model = copy.deepcopy(model).to(device).train()
        self.augment, self.bf16, self.device = augment, bf16, device
        if compiled:
            self.model.backbone.compile()
        cfg = self.model.cfg
        self.opt = torch.optim.SGD(self.model.parameter_groups(), lr=cfg.lr, momentum=cfg.momentum)
        self.loader, self.it = loader, iter(loader)
        self.smoothing = float(self.model.opts.get("label_smoothing", 0.0))

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            x, y = next(self.it)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def step(self) -> None:
        x, y = self._batch()
        v = self.augment(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model.classify(v)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def block(self, n: int) -> float:
        """Run ``n`` steps; the mean ms per step."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3 / n


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[0] += time.perf_counter() - t0

    return wrapper


def _interleave_callback(bare: BareLoop, block: int, warmup: int, costs: dict[str, list[float]]) -> Any:
    import lightning as L

    class Interleave(L.Callback):
        """Times Lightning steps (batch start to batch start) and runs a bare block after every ``block`` steps;
        snapshots the ``costs`` accumulators when timing starts and ends (their per-step share is over that span)."""

        def __init__(self) -> None:
            self.lightning: list[list[float]] = [[]]
            self.bare: list[float] = []
            self._last: float | None = None
            self.start: tuple[int, dict[str, float]] | None = None
            self.end: tuple[int, dict[str, float]] | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self._last is not None and trainer.global_step > warmup:
                self.lightning[-1].append((now - self._last) * 1e3)
                if self.start is None:
                    self.start = (trainer.global_step, {k: v[0] for k, v in costs.items()})
                self.end = (trainer.global_step, {k: v[0] for k, v in costs.items()})
            self._last = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step > warmup and len(self.lightning[-1]) >= block:
                _sync(bare.device)
                self.bare.append(bare.block(block))
                self.lightning.append([])
                self._last = None  # the next interval starts after the bare block

    return Interleave()


def _run_config(quick: bool, device: torch.device):
    from batchmates.config import RunConfig
    from batchmates.data.datasets import DatasetNotFoundError
    from batchmates.methods import get_method

    data = "digits"
    if not quick:
        try:
            from batchmates.data import load_dataset

            load_dataset("fashion-mnist")
            data = "fashion-mnist"
        except DatasetNotFoundError:
            pass
    settings: dict[str, Any] = dict(method="ce", data=data, progress=False, eval_protocols=["accuracy"],
                                    accelerator="gpu" if device.type == "cuda" else "cpu")
    if quick:
        settings.update(backbone="cnn", batch_size=32)
    return RunConfig(**settings).resolve(get_method("ce"))


def lightning_overhead(device: torch.device, quick: bool) -> tuple[list[BenchRow], dict[str, Any]]:
    """The real trainer's step against the bare loop (same aug, precision, optimiser), interleaved blocks."""
    import lightning as L

    from batchmates.methods import get_method
    from batchmates.training.callbacks import History, StepSeeding, Throughput
    from batchmates.training.data import RunDataModule
    from batchmates.training.run import _trainer

    block, rounds, warmup = (4, 2, 2) if quick else (20, 8, 10)
    with tempfile.TemporaryDirectory() as out:
        cfg = _run_config(quick, device).replace(out=out, max_steps=warmup + 1 + (block + 1) * (rounds + 1),
                                                 epochs=1000)
        data = RunDataModule(cfg)
        data.setup("fit")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        model = get_method("ce")(cfg, data.info)
        model.steps_per_epoch = max(1, len(data.train_dataloader()))
        bf16 = cfg.precision == "bf16-mixed"
        bare = BareLoop(model, data.train_dataloader(), model.train_augment, bf16=bf16, device=device)
        trainer, _ = _trainer(cfg, model, False)
        costs: dict[str, list[float]] = {"log_train": [0.0], "callbacks": [0.0]}
        model.log_train = _timed(model.log_train, costs["log_train"])  # type: ignore[method-assign]
        for cb in trainer.callbacks:
            if isinstance(cb, History | StepSeeding | Throughput):
                for hook in ("on_train_batch_start", "on_train_batch_end"):
                    setattr(cb, hook, _timed(getattr(cb, hook), costs["callbacks"]))
        inter = _interleave_callback(bare, block, warmup, costs)
        trainer.callbacks.append(inter)
        for _ in range(warmup):
            bare.step()
        trainer.fit(model, datamodule=data)
    blocks = [b for b in inter.lightning if len(b) >= block][:len(inter.bare)]
    l_ms = statistics.median(statistics.fmean(b) for b in blocks)
    b_ms = statistics.median(inter.bare[:len(blocks)])
    (s0, c0), (s1, c1) = inter.start, inter.end
    per_step = {k: (c1[k] - c0[k]) * 1e3 / max(1, s1 - s0) for k in costs}
    case = f"ce {cfg.backbone} {cfg.data} b{cfg.batch_size} {cfg.precision}"
    imgs = cfg.batch_size
    overhead = l_ms / b_ms - 1
    rows = [
        BenchRow(BENCHMARK, case, "batchmates train (Lightning + callbacks)", l_ms, None, str(device),
                 {"img_per_s": imgs / l_ms * 1e3, "overhead_vs_bare": overhead, "target_max_overhead": TARGET_OVERHEAD,
                  "log_train_ms_per_step": per_step["log_train"], "callbacks_ms_per_step": per_step["callbacks"],
                  "blocks": len(blocks), "block_steps": block}),
        BenchRow(BENCHMARK, case, "bare torch loop (same aug, precision, optimiser)", b_ms, None, str(device),
                 {"img_per_s": imgs / b_ms * 1e3}),
    ]
    return rows, {"case": case, "cfg": cfg, "model": model, "overhead": overhead, "per_step": per_step,
                  "lightning_ms": l_ms, "bare_ms": b_ms, "loader": data.train_dataloader()}


def _pair(name: str, a: BareLoop, b: BareLoop, block: int, rounds: int) -> tuple[float, float]:
    """Median ms/step of two bare loops timed in alternating blocks (ABBA)."""
    ta, tb = [], []
    for r in range(rounds):
        for which in ((a, b) if r % 2 == 0 else (b, a)):
            (ta if which is a else tb).append(which.block(block))
    return statistics.median(ta), statistics.median(tb)


def step_variants(device: torch.device, quick: bool, ctx: dict[str, Any]) -> list[BenchRow]:
    """Augmentation path, bf16 vs fp32 and compile vs eager, each as an interleaved pair of bare loops."""
    model, cfg, loader = ctx["model"], ctx["cfg"], ctx["loader"]
    block, rounds = (3, 2) if quick else (10, 6)
    rows: list[BenchRow] = []
    bf16 = cfg.precision == "bf16-mixed"

    def aug(backend: str) -> Any:  # the run's own weak augmentation (its padding and flips) on each path
        return model.make_augment("weak", backend=backend).to(device)

    def add(what: str, impl: str, ms: float, extra: dict[str, Any]) -> None:
        rows.append(BenchRow(BENCHMARK, f"{ctx['case']}: {what}", impl, ms, None, str(device),
                             {"img_per_s": cfg.batch_size / ms * 1e3, **extra}))

    # augmentation: the whole step with each path, and the augmentation of one batch alone
    loops = {k: BareLoop(model, loader, aug(k), bf16=bf16, device=device) for k in ("torch", "kornia")}
    for lp in loops.values():
        lp.block(2)
    t_torch, t_kornia = _pair("aug", loops["torch"], loops["kornia"], block, rounds)
    x = next(iter(loader))[0].to(device)
    alone = {}
    for k in ("torch", "kornia"):
        a = aug(k)
        a(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(20):
            a(x)
        _sync(device)
        alone[k] = (time.perf_counter() - t0) * 1e3 / 20
    add("augmentation path", "step with plain-torch crop+flip (PadCropFlip)", t_torch,
        {"augment_ms": alone["torch"], "augment_share": alone["torch"] / t_torch})
    add("augmentation path", "step with kornia RandomCrop+RandomHorizontalFlip", t_kornia,
        {"augment_ms": alone["kornia"], "augment_share": alone["kornia"] / t_kornia,
         "slowdown_vs_torch": t_kornia / t_torch - 1})

    # precision: bf16 autocast against fp32, same augmentation
    if native_bf16(device):
        lo = {p: BareLoop(model, loader, aug("torch"), bf16=p, device=device) for p in (False, True)}
        for lp in lo.values():
            lp.block(2)
        t32, t16 = _pair("precision", lo[False], lo[True], block, rounds)
        add("precision", "bare step fp32", t32, {})
        add("precision", "bare step bf16 autocast", t16, {"speedup_vs_fp32": t32 / t16})
    else:
        add("precision", "bf16 autocast (skipped)", float("nan"), {"skipped": "no native bf16 on this device"})

    # compile: the backbone under torch.compile against eager (not in quick runs: compiling takes minutes on a CPU)
    if quick:
        return rows
    eager = BareLoop(model, loader, aug("torch"), bf16=bf16, device=device)
    try:
        comp = BareLoop(model, loader, aug("torch"), bf16=bf16, device=device, compiled=True)
        t0 = time.perf_counter()
        comp.block(3)  # compiles (train mode)
        compile_s = time.perf_counter() - t0
        eager.block(2)
        t_e, t_c = _pair("compile", eager, comp, block, rounds)
        add("compile", "bare step eager", t_e, {})
        add("compile", "bare step torch.compile(backbone)", t_c,
            {"speedup_vs_eager": t_e / t_c, "compile_s": compile_s})
    except Exception as e:  # noqa: BLE001 - a compiler failure is a finding to report
        add("compile", "bare step torch.compile(backbone)", float("nan"),
            {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    return rows


def per_step_costs(device: torch.device, ctx: dict[str, Any]) -> list[BenchRow]:
    """Per-step costs that are not model work, each against the Lightning step: reseeding, logging, callbacks."""
    from batchmates.seeding import seed_step

    n = 500
    t0 = time.perf_counter()
    for s in range(n):
        seed_step(0, s)
    seed_ms = (time.perf_counter() - t0) * 1e3 / n
    step = ctx["lightning_ms"]
    rows = []
    for impl, ms in (("per-step reseeding (seed_step)", seed_ms),
                     ("Method.log_train per step", ctx["per_step"]["log_train"]),
                     ("trainer callbacks' batch hooks per step", ctx["per_step"]["callbacks"])):
        rows.append(BenchRow(BENCHMARK, f"{ctx['case']}: not model work", impl, ms, None, str(device),
                             {"share_of_lightning_step": ms / step}))
    return rows


def summary(rows: list[BenchRow]) -> str:
    """The ratios of a run (framework overhead, augmentation path, bf16, compile) as Markdown bullet lines."""
    by = {r.impl: r for r in rows if r.benchmark == BENCHMARK}
    lit = by.get("batchmates train (Lightning + callbacks)")
    if lit is None:
        return ""
    over = lit.extra["overhead_vs_bare"]
    bare = by["bare torch loop (same aug, precision, optimiser)"]
    lines = [f"- framework overhead ({lit.case}): {lit.time_ms:.1f} vs {bare.time_ms:.1f} ms/step "
             f"({lit.extra['img_per_s']:.0f} vs {bare.extra['img_per_s']:.0f} images/s): **{over:+.1%}** "
             f"({'within' if over <= TARGET_OVERHEAD else 'over'} the {TARGET_OVERHEAD:.0%} target)"]
    k = by.get("step with kornia RandomCrop+RandomHorizontalFlip")
    if k is not None:
        lines.append(f"- kornia crop+flip: step {k.extra['slowdown_vs_torch']:+.1%} vs plain torch (augmentation "
                     f"alone {k.extra['augment_ms']:.2f} vs "
                     f"{by['step with plain-torch crop+flip (PadCropFlip)'].extra['augment_ms']:.2f} ms per batch)")
    p = by.get("bare step bf16 autocast")
    if p is not None and p.extra and "speedup_vs_fp32" in p.extra:
        lines.append(f"- bf16 autocast: **{p.extra['speedup_vs_fp32']:.2f}x** the fp32 images/s")
    c = by.get("bare step torch.compile(backbone)")
    if c is not None and c.extra and "speedup_vs_eager" in c.extra:
        lines.append(f"- torch.compile of the backbone: {c.extra['speedup_vs_eager']:.2f}x eager images/s "
                     f"(compiling took {c.extra['compile_s']:.0f} s)")
    return "\n".join(lines) + "\n"


def run(device: str, quick: bool) -> list[BenchRow]:
    dev = torch.device(device)
    rows, ctx = lightning_overhead(dev, quick)
    rows += per_step_costs(dev, ctx)
    rows += step_variants(dev, quick, ctx)
    print(f"[bench] train ({dev}):\n" + summary(rows), flush=True)
    return rows
