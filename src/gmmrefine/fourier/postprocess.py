"""Half-map post-processing: masked FSC with phase-randomisation correction, sharpening, filtering.

Follows ``relion_postprocess`` (RELION 3.1):

1. FSC of the unmasked half maps; FSC of the masked half maps.
2. Chen et al. (2013): both halves get random phases beyond the shell where the unmasked FSC first
   drops below 0.8; their masked FSC ``FSC_n`` measures the correlation the mask alone creates, and
   ``FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)`` beyond two shells past that point.
3. Resolution where the (corrected) FSC falls below 0.143.
4. The average of the halves is weighted by ``sqrt(2 FSC / (1 + FSC))``, sharpened by a B-factor fitted
   to the Guinier plot (``ln |F|`` against ``1/d^2`` between ``lowres_A`` and the resolution) or by a
   reference amplitude profile (the paper's method), and low-passed to the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

import torch

from gmmrefine.fourier.filters import (
    apply_bfactor,
    apply_shell_weights,
    fsc_weights,
    low_pass,
    radial_amplitude,
    randomise_phases,
)
from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at, shell_frequencies

# relion_postprocess defaults.
RANDOMISE_AT_FSC = 0.8
CORRECTION_OFFSET_SHELLS = 2


class CorrectedFSC(TypedDict):
    """What :func:`corrected_fsc` returns: four ``(D // 2 + 1,)`` float64 curves and the first randomised shell."""

    unmasked: torch.Tensor
    masked: torch.Tensor
    randomised: torch.Tensor
    corrected: torch.Tensor
    randomise_from_shell: int


def masked_fsc(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FSC of ``half1 * mask`` and ``half2 * mask``: ``(D // 2 + 1,)`` float64."""
    return fourier_shell_correlation(half1 * mask, half2 * mask)


def first_shell_below(curve: torch.Tensor, threshold: float) -> int:
    """First shell (>= 1) where ``curve < threshold``; ``len(curve)`` if it never does."""
    below = torch.nonzero(curve[1:] < threshold)
    return int(below[0]) + 1 if below.numel() else int(curve.shape[0])


def corrected_fsc(
    half1: torch.Tensor,
    half2: torch.Tensor,
    mask: torch.Tensor,
    *,
    randomise_from_shell: int | None = None,
    generator: torch.Generator | None = None,
) -> CorrectedFSC:
    """Masked FSC corrected for the mask by phase randomisation (Chen et al. 2013).

    Args:
        half1, half2: ``(D, D, D)`` unmasked half maps.
        mask: ``(D, D, D)`` soft mask in [0, 1].
        randomise_from_shell: first randomised shell; default: where the unmasked FSC first drops below
            0.8 (``relion_postprocess --randomize_at_fsc 0.8``).
        generator: random phases (fixed for reproducible output).

    Returns:
        ``{"unmasked", "masked", "randomised", "corrected"}`` curves ``(D // 2 + 1,)`` float64 and
        ``"randomise_from_shell"``. ``corrected`` equals ``masked`` up to
        ``randomise_from_shell + 2`` and ``(FSC_t - FSC_n) / (1 - FSC_n)`` beyond.
    """
    unmasked = fourier_shell_correlation(half1, half2)
    masked = masked_fsc(half1, half2, mask)
    start = first_shell_below(unmasked, RANDOMISE_AT_FSC) if randomise_from_shell is None else int(randomise_from_shell)
    start = max(start, 1)
    if start >= unmasked.shape[0]:
        randomised = torch.zeros_like(masked)
        corrected = masked.clone()
    else:
        r1 = randomise_phases(half1, start, generator=generator)
        r2 = randomise_phases(half2, start, generator=generator)
        randomised = masked_fsc(r1, r2, mask)
        corrected = masked.clone()
        tail = torch.arange(masked.shape[0], device=masked.device) > start + CORRECTION_OFFSET_SHELLS
        fn = randomised.clamp(max=1 - 1e-6)
        corrected = torch.where(tail, (masked - fn) / (1 - fn), masked)
    return {"unmasked": unmasked, "masked": masked, "randomised": randomised, "corrected": corrected,
            "randomise_from_shell": start}


def guinier(volume: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guinier plot of a map: ``(k^2 in 1/A^2, ln mean amplitude)`` per shell, ``(D // 2 + 1,)`` each."""
    box = volume.shape[-1]
    k = shell_frequencies(box, apix).to(volume.device)
    amp = radial_amplitude(volume)
    return k ** 2, torch.log(amp.clamp_min(1e-30))


def auto_bfactor(volume: torch.Tensor, apix: float, *, lowres_A: float = 10.0, highres_A: float | None = None
                 ) -> tuple[float, float]:
    """B-factor from the slope of the Guinier plot, as ``relion_postprocess --auto_bfac``.

    A straight line ``ln |F| = a + b k^2`` is fitted to the shells between ``lowres_A`` and
    ``highres_A`` (default Nyquist); the returned B-factor is ``4 b`` (negative for a map whose
    amplitudes fall off), so :func:`apply_bfactor` with it flattens the fall-off.

    Returns:
        ``(bfactor_A2, intercept)``.

    Raises:
        ValueError: fewer than 3 shells in the fitting range.
    """
    k2, ln_amp = guinier(volume, apix)
    hi = 1.0 / (2 * apix) if highres_A is None else 1.0 / highres_A
    keep = (k2 >= 1.0 / lowres_A ** 2) & (k2 <= hi ** 2)
    if int(keep.sum()) < 3:
        raise ValueError(f"fewer than 3 Fourier shells between {lowres_A} A and {1 / hi:.2f} A to fit a B-factor")
    x, y = k2[keep], ln_amp[keep]
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    return 4.0 * float(coef[1]), float(coef[0])


def sharpen_to_profile(volume: torch.Tensor, reference_amplitude: torch.Tensor) -> torch.Tensor:
    """Scale each Fourier shell so its mean amplitude matches ``reference_amplitude`` (the paper's
    sharpening by a reference profile, e.g. of a GMM or an atomic model).

    Args:
        volume: ``(D, D, D)`` map.
        reference_amplitude: ``(D // 2 + 1,)`` mean amplitude per shell of the reference (see
            :func:`gmmrefine.fourier.filters.radial_amplitude`).
    """
    amp = radial_amplitude(volume)
    ratio = reference_amplitude.to(amp) / amp.clamp_min(1e-30)
    return apply_shell_weights(volume, torch.where(amp > 0, ratio, torch.zeros_like(ratio)))


@dataclass
class PostprocessResult:
    """Everything :func:`postprocess` computes.

    ``curves`` holds float64 ``(D // 2 + 1,)`` FSC curves (``unmasked``; with a mask also ``masked``,
    ``randomised`` and ``corrected``), ``resolution_A`` is read off the corrected curve (unmasked
    without a mask), ``bfactor_A2`` the sharpening B-factor applied (None when a reference profile
    was used), ``sharpened`` the FSC-weighted, sharpened, low-passed full map (unmasked) and
    ``sharpened_masked`` that map times the mask.
    """

    box: int
    apix: float
    curves: dict[str, torch.Tensor]
    resolution_A: float
    resolution_05_A: float
    randomise_from_shell: int | None
    bfactor_A2: float | None
    sharpened: torch.Tensor
    sharpened_masked: torch.Tensor | None
    guinier: dict[str, list[float]] = field(default_factory=dict)


def postprocess(
    half1: torch.Tensor,
    half2: torch.Tensor,
    apix: float,
    mask: torch.Tensor | None = None,
    *,
    bfactor_A2: float | None = None,
    lowres_A: float = 10.0,
    reference_amplitude: torch.Tensor | None = None,
    seed: int = 0,
) -> PostprocessResult:
    """Gold-standard resolution and a sharpened map from two half maps (see the module docstring).

    Args:
        half1, half2: ``(D, D, D)`` unfiltered half maps.
        apix: pixel size (A/px).
        mask: optional ``(D, D, D)`` soft mask in [0, 1].
        bfactor_A2: sharpening B-factor to apply (negative sharpens); None fits it (auto).
        lowres_A: low-resolution limit of the Guinier fit.
        reference_amplitude: ``(D // 2 + 1,)`` amplitude profile to sharpen to instead of a B-factor.
        seed: seed of the phase randomisation.
    """
    box = half1.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    if mask is not None:
        fsc = corrected_fsc(half1, half2, mask, generator=gen)
        start = int(fsc["randomise_from_shell"])
        curves = {"unmasked": fsc["unmasked"], "masked": fsc["masked"], "randomised": fsc["randomised"],
                  "corrected": fsc["corrected"]}
        final = curves["corrected"]
    else:
        curves = {"unmasked": fourier_shell_correlation(half1, half2)}
        start = None
        final = curves["unmasked"]
    resolution = resolution_at(final, box, apix, 0.143)
    resolution_05 = resolution_at(final, box, apix, 0.5)
    full = 0.5 * (half1 + half2)
    weighted = apply_shell_weights(full, fsc_weights(final))
    fit_map = weighted if mask is None else weighted * mask
    k2, ln_amp = guinier(fit_map, apix)
    if reference_amplitude is not None:
        sharpened = sharpen_to_profile(weighted, reference_amplitude * radial_fsc_weight_profile(final))
        bfac = None
    else:
        if bfactor_A2 is None:
            try:
                bfac, _ = auto_bfactor(fit_map, apix, lowres_A=lowres_A, highres_A=resolution)
            except ValueError:
                # Resolution too low for a Guinier fit between lowres_A and it: no sharpening.
                bfac = 0.0
        else:
            bfac = float(bfactor_A2)
        sharpened = apply_bfactor(weighted, bfac, apix)
    sharpened = low_pass(sharpened, resolution, apix)
    return PostprocessResult(
        box=box, apix=apix, curves=curves, resolution_A=resolution, resolution_05_A=resolution_05,
        randomise_from_shell=start, bfactor_A2=bfac, sharpened=sharpened,
        sharpened_masked=None if mask is None else sharpened * mask,
        guinier={"k2_invA2": k2.tolist(), "ln_amplitude": ln_amp.tolist()},
    )


def radial_fsc_weight_profile(fsc: torch.Tensor) -> torch.Tensor:
    """The FSC weights applied to the map, so a reference profile is compared like for like."""
    return fsc_weights(fsc)
