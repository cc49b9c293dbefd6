"""Origin shifts in RELION's convention.

RELION stores per-particle ``rlnOriginXAngst/YAngst`` (3.1+) or ``rlnOriginX/Y`` in pixels (3.0).
Measured with ``relion_project`` (``tests/test_conventions_relion.py``): the particle image is the
projection translated by **minus** the origin, i.e. a feature at image position ``p`` in the centred
projection appears at ``p - origin``. To centre a particle, translate it by ``+origin``.

gmmrefine keeps RELION's number (``shift_A`` = origin in angstrom) and converts it here, so the sign
lives in exactly one place.
"""

from __future__ import annotations

import torch


def image_translation_px(shift_A: torch.Tensor, apix: float | torch.Tensor) -> torch.Tensor:
    """Translation (pixels, x then y) that takes the centred projection to the particle image.

    Args:
        shift_A: ``(..., 2)`` RELION origin (x, y) in angstrom.
        apix: pixel size in angstrom per pixel (scalar or broadcastable to ``(..., 1)``).

    Returns:
        ``(..., 2)`` translation in pixels: ``-shift_A / apix``.
    """
    apix = torch.as_tensor(apix, dtype=shift_A.dtype, device=shift_A.device)
    if apix.ndim > 0:
        apix = apix[..., None]
    return -shift_A / apix
