"""The trainer's framework overhead with the per-step logging before issue 10 (a Lightning ``self.log`` of the loss
and the accuracy, and of img/s, at every step) and after it (epoch means as running sums, step values every
``log_every_n_steps``), in one process, alternating (``bench.train.lightning_overhead`` each time)::

    OMP_NUM_THREADS=1 python scripts/bench_logging_before_after.py
"""

import logging
import warnings

import torch

from batchmates.bench.train import lightning_overhead
from batchmates.methods.base import Method
from batchmates.training.callbacks import Throughput

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
NEW = (Method.log_train, Throughput.on_train_batch_end)


def old_log_train(self, loss, *, batch_size, acc=None, **extra):
    self.log("train/loss", loss.detach().float(), prog_bar=True, on_step=True, on_epoch=True,
             batch_size=batch_size, sync_dist=True)
    if acc is not None:
        self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=batch_size,
                 sync_dist=True)
    for k, v in extra.items():
        self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)


def old_throughput_log(self, trainer, pl_module, outputs, batch, batch_idx):
    if self.rate is not None:
        pl_module.log("img_per_s", self.rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


for _ in range(2):
    for name, (log_train, throughput) in (("before", (old_log_train, old_throughput_log)), ("after", NEW)):
        Method.log_train, Throughput.on_train_batch_end = log_train, throughput
        _, ctx = lightning_overhead(torch.device("cpu"), False)
        print(f"{name}: Lightning {ctx['lightning_ms']:.2f} ms/step, bare {ctx['bare_ms']:.2f}, overhead "
              f"{ctx['overhead']:+.1%}, log_train {ctx['per_step']['log_train']:.2f} ms, callbacks "
              f"{ctx['per_step']['callbacks']:.2f} ms", flush=True)
Method.log_train, Throughput.on_train_batch_end = NEW
