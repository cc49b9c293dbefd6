"""Direct Fourier inversion with summable accumulators (``insert``) and maps from them (``invert``)."""

from gmmrefine.reconstruct.insert import FourierAccumulator, hermitian_symmetrised, symmetrised_grids
from gmmrefine.reconstruct.invert import (
                                          accumulate_halves,
                                          accumulate_images,
                                          prepare_spectra,
                                          reconstruct_halves,
                                          reconstruct_map,
                                          reconstruct_maps_low_memory,
                                          symmetry_matrices,
)

__all__ = ["FourierAccumulator", "accumulate_halves", "accumulate_images", "hermitian_symmetrised",
           "prepare_spectra", "reconstruct_halves", "reconstruct_map", "reconstruct_maps_low_memory",
           "symmetrised_grids", "symmetry_matrices"]
