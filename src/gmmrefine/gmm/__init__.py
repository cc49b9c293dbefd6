"""gmmrefine.gmm: the GaussianMixture reference, its band-limited projection, FRC loss, rendering,
building from maps or models, width masks and patches."""

from gmmrefine.gmm.build import build_gmm, estimate_n, map_gmm_fsc
from gmmrefine.gmm.loss import frc_loss
from gmmrefine.gmm.masks import kmeans_patches, width_mask
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import FourierBand, fourier_band, project_band, project_gmm
from gmmrefine.gmm.render import render_image, render_map

__all__ = [
           "FourierBand",
           "GaussianMixture",
           "build_gmm",
           "estimate_n",
           "fourier_band",
           "frc_loss",
           "kmeans_patches",
           "map_gmm_fsc",
           "project_band",
           "project_gmm",
           "render_image",
           "render_map",
           "width_mask",
]
