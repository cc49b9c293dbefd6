"""gmmrefine.hetero: per-particle conformations from a GMM encoder/decoder trained on each half set on
its own (:mod:`~gmmrefine.hetero.networks`, :mod:`~gmmrefine.hetero.train`), the files of a
heterogeneity job (:mod:`~gmmrefine.hetero.outputs`) and conformation to domain pose
(:mod:`~gmmrefine.hetero.conformation`)."""

from gmmrefine.hetero.networks import Decoder, Encoder, build_decoder, half_seed, pca, pretrain_decoder
from gmmrefine.hetero.train import HalfResult, HeteroSettings, latent_table, train_halves

__all__ = [
           "Decoder",
           "Encoder",
           "HalfResult",
           "HeteroSettings",
           "build_decoder",
           "half_seed",
           "latent_table",
           "pca",
           "pretrain_decoder",
           "train_halves",
]
