"""SwAV: swapped prediction of online cluster assignments (Caron et al. 2020, arXiv:2006.09882).

Building blocks, each usable on its own:

* :func:`sinkhorn_knopp` - the equal-partition soft codes of a batch (paper, Sec. 3.1 and Alg. 1 / official code).
* :class:`SwAVPrototypes` - the prototype layer ``C`` (a bias-free linear map with unit-norm rows).
* :func:`swav_loss` / :class:`SwAVLoss` - the multi-crop swapped-prediction loss.
* :class:`SwAVQueue` - the optional queue of past embeddings used to stabilise the codes of small batches.

One module each: :mod:`.sinkhorn`, :mod:`.loss`, :mod:`.prototypes`, :mod:`.queue` (``_common`` holds the shared
input checks). Everything is re-exported here, so ``from batchmates.losses.swav import ...`` keeps working.

A training step (single process or DDP, unchanged)::

    protos = SwAVPrototypes(dim=128, n_prototypes=3000, freeze_iterations=313)
    queue = SwAVQueue(length=3840, dim=128)               # optional; length a multiple of the global batch
    loss_fn = SwAVLoss()
    z = [projector(backbone(v)) for v in crops]           # high-resolution crops first
    scores = protos(z)                                    # list of [B, K]; input and rows L2-normalised
    queue_scores = queue.scores(protos) if use_queue else None   # None until the queue is full
    loss = loss_fn(scores[:2], scores[2:], queue_scores=queue_scores)
    loss.backward()
    protos.freeze_prototypes_if(step)                     # drops prototype grads for the first iterations
    optimizer.step()
    if use_queue:
        queue.enqueue(z[:2])                              # after the loss, as the official code does

Paper: the codes, the swapped prediction, the multi-crop average, the prototypes and the queue; each module's
docstring says which parts are the paper's and which are the library's choices.

Library choices: Sinkhorn runs in the log domain in float32 or higher (rows sum to 1 for any finite scores, no
sample is ever dropped silently). Global-batch semantics (METHODS.md): Sinkhorn's prototype totals are
all-reduced across ranks (scores are never gathered), the loss is the mean over the global batch, and the queue
holds the gathered global batch on every rank, so W ranks with B/W samples each give the value and gradients of
one process with all B.
"""

from ._common import ScoreList  # noqa: F401  (type alias, importable from the old module path)
from .loss import SwAVLoss, swav_loss
from .prototypes import SwAVPrototypes
from .queue import SwAVQueue
from .sinkhorn import sinkhorn_knopp

__all__ = ["sinkhorn_knopp", "swav_loss", "SwAVLoss", "SwAVPrototypes", "SwAVQueue"]
