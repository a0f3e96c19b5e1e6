"""Representative batch curation with the Fréchet ResNet Distance (The Bad Batches, arXiv:2403.19579).

``frechet``: discrete (pairwise) and Gaussian Fréchet distances; ``scorer``: scoring two-view batches with a
frozen or online extractor (per-pair discrete Fréchet or squared L2 distances, or one Gaussian FRD per batch);
``curator``: per-pair drop / reweight / resample policies; ``batch``: the batch-level Gaussian FRD and the
skip / re-augment decision. Every decision is taken on the global batch under torch.distributed. See
``docs/curation.md`` for which reading of the paper each policy implements and what each costs.
"""

from batchmates.curation.batch import BatchCurator, batch_frd, global_batch_frd
from batchmates.curation.curator import CurationResult, Curator, apply_curation, weighted_mean
from batchmates.curation.frechet import (
    discrete_frechet_distance,
    discrete_frechet_distance_all_pairs,
    gaussian_frechet_distance,
)
from batchmates.curation.scorer import FRDScorer, pair_distance, squared_l2_distance

__all__ = [
    "discrete_frechet_distance",
    "discrete_frechet_distance_all_pairs",
    "gaussian_frechet_distance",
    "squared_l2_distance",
    "pair_distance",
    "FRDScorer",
    "Curator",
    "CurationResult",
    "apply_curation",
    "weighted_mean",
    "BatchCurator",
    "batch_frd",
    "global_batch_frd",
]
