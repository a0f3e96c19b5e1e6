"""Representative batch curation with the Fréchet ResNet Distance (The Bad Batches, arXiv:2403.19579).

``frechet``: discrete (pairwise) and Gaussian Fréchet distances; ``scorer``: FRD scoring of two-view batches with
a frozen or online extractor; ``curator``: drop / reweight / resample policies, exact under torch.distributed.
"""

from batchmates.curation.curator import CurationResult, Curator, apply_curation, weighted_mean
from batchmates.curation.frechet import (
    discrete_frechet_distance,
    discrete_frechet_distance_all_pairs,
    gaussian_frechet_distance,
)
from batchmates.curation.scorer import FRDScorer

__all__ = [
    "discrete_frechet_distance",
    "discrete_frechet_distance_all_pairs",
    "gaussian_frechet_distance",
    "FRDScorer",
    "Curator",
    "CurationResult",
    "apply_curation",
    "weighted_mean",
]
