"""RELION's contrast transfer function, batched in torch.

Definition (RELION 3.1 ``CTF::getCTF``; checked against ``relion_project --ctf`` in
``tests/test_conventions_relion.py``)::

    lambda = 12.2643247 / sqrt(V * (1 + 0.978466e-6 * V))           # A, V in volts (relativistic)
    x' =  cos(a) kx + sin(a) ky,  y' = -sin(a) kx + cos(a) ky          # a = rlnDefocusAngle
    gamma = -pi lambda (DefocusU x'^2 + DefocusV y'^2) + pi/2 Cs lambda^3 |k|^4
            - phase_shift - asin(Q0)
    CTF = -scale * sin(gamma) * exp(-B |k|^2 / 4)

with k in 1/A, Cs in A (``rlnSphericalAberration`` mm * 1e7), defocus in A with underfocus positive and
Q0 = ``rlnAmplitudeContrast``. ``DefocusU`` is the defocus along the direction at angle ``a`` from the
+x axis (image columns) towards +y (image rows), i.e. counter-clockwise when y points up.

Sign: CTF(0) = +scale * sin(asin(Q0) + phase_shift) = +Q0 without a phase plate, and the CTF stays
positive until the first zero. A RELION particle is ``CTF * projection`` (no contrast inversion here).
"""

from __future__ import annotations

import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.fft import freq_grid_2d, irfft2_centered, rfft2_centered


def electron_wavelength_A(voltage_kV: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength as RELION computes it.

    Args:
        voltage_kV: ``(...)`` acceleration voltage in kV.

    Returns:
        ``(...)`` wavelength in angstrom (0.01969 A at 300 kV).
    """
    volts = torch.as_tensor(voltage_kV) * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + volts * 0.978466e-6))


def _batch_param(value, name: str, batch: int | None, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or (batch is not None and t.shape[0] not in (1, batch)):
        raise InputError(f"CTF parameter {name}: expected a (B,) tensor of one value per image, "
                         f"got shape {tuple(t.shape)}")
    return t


def ctf_2d(
    freq_A: torch.Tensor,
    *,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    voltage_kV,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    scale=1.0,
) -> torch.Tensor:
    """RELION's CTF at arbitrary frequencies.

    Args:
        freq_A: ``(..., 2)`` frequencies (kx, ky) in 1/A.
        defocus_u_A, defocus_v_A: ``(B,)`` defocus in A, underfocus positive.
        defocus_angle_deg: ``(B,)`` astigmatism angle (direction of U from +x towards +y), degrees.
        voltage_kV: ``(B,)`` kV.  cs_mm: ``(B,)`` mm.  amplitude_contrast: ``(B,)`` fraction in [0, 1].
        phase_shift_deg: ``(B,)`` phase-plate shift in degrees.  bfactor_A2: ``(B,)`` envelope B in A^2.
        scale: ``(B,)`` overall factor. Scalars broadcast to every image.

    Returns:
        ``(B, ...)`` CTF values in the dtype of ``freq_A``.
    """
    like = freq_A
    params = dict(defocus_u_A=defocus_u_A, defocus_v_A=defocus_v_A, defocus_angle_deg=defocus_angle_deg,
                  voltage_kV=voltage_kV, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
                  phase_shift_deg=phase_shift_deg, bfactor_A2=bfactor_A2, scale=scale)
    batch = max(torch.as_tensor(v).numel() for v in params.values())
    p = {k: _batch_param(v, k, batch, like) for k, v in params.items()}
    q0 = p["amplitude_contrast"]
    if bool(((q0 < 0) | (q0 > 1)).any()):
        raise InputError("CTF parameter amplitude_contrast (rlnAmplitudeContrast): expected a fraction in [0, 1]")

    extra = freq_A.ndim - 1
    shape = (-1,) + (1,) * extra

    def col(name: str) -> torch.Tensor:
        return p[name].reshape(shape)

    kx, ky = freq_A[..., 0], freq_A[..., 1]
    k2 = kx * kx + ky * ky
    angle = torch.deg2rad(col("defocus_angle_deg"))
    cos_a, sin_a = torch.cos(angle), torch.sin(angle)
    along_u = cos_a * kx + sin_a * ky
    along_v = -sin_a * kx + cos_a * ky
    defocus_k2 = col("defocus_u_A") * along_u**2 + col("defocus_v_A") * along_v**2
    lam = electron_wavelength_A(col("voltage_kV"))
    cs_A = col("cs_mm") * 1e7
    gamma = (-torch.pi * lam * defocus_k2 + 0.5 * torch.pi * cs_A * lam**3 * k2 * k2
             - torch.deg2rad(col("phase_shift_deg")) - torch.asin(col("amplitude_contrast")))
    envelope = torch.exp(-col("bfactor_A2") * k2 / 4.0)
    return -col("scale") * torch.sin(gamma) * envelope


def ctf_for_box(box: int, apix: float, *, device=None, dtype=torch.float32, **params) -> torch.Tensor:
    """CTF on the rfft2 grid of ``box``-pixel images (:func:`gmmrefine.fourier.fft.freq_grid_2d` layout).

    Args:
        box: image size D in pixels.
        apix: pixel size in A/px.
        **params: the keyword arguments of :func:`ctf_2d` (the keys of ``CTFParams.as_tensors()``).

    Returns:
        ``(B, D, D//2+1)`` CTF values.
    """
    freq_A = freq_grid_2d(box, device=device, dtype=dtype) / apix
    return ctf_2d(freq_A, **params)


def phase_flip(spectra: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Multiply spectra by the sign of the CTF (RELION's ``do_only_flip_phases``: sign(0) = +1).

    Args:
        spectra: ``(B, D, D//2+1)`` complex.
        ctf: ``(B, D, D//2+1)`` real (or broadcastable).

    Returns:
        ``(B, D, D//2+1)`` phase-flipped spectra.
    """
    sign = torch.where(ctf < 0, -1.0, 1.0).to(ctf.dtype)
    return spectra * sign


def phase_flip_images(images: torch.Tensor, apix: float, **params) -> torch.Tensor:
    """Phase-flip real-space particle images by their CTF.

    Args:
        images: ``(B, D, D)`` real images.
        apix: pixel size in A/px.
        **params: CTF parameters as for :func:`ctf_2d`, one value per image.

    Returns:
        ``(B, D, D)`` real images with every Fourier coefficient multiplied by sign(CTF).
    """
    box = images.shape[-1]
    ctf = ctf_for_box(box, apix, device=images.device, dtype=images.dtype, **params)
    return irfft2_centered(phase_flip(rfft2_centered(images), ctf), box)
