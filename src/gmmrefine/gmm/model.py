"""The Gaussian mixture model that stands in for the voxel map.

Density convention (shared by projection, rendering and fitting; keep them in step):

* The 3D density is ``M(x) = sum_j A_j exp(-|x - c_j|^2 / (2 s_j^2))``: ``A_j`` is the peak value of
  Gaussian ``j`` in map units, ``c_j`` its centre (x, y, z in angstrom from the box centre, i.e. from
  voxel ``D // 2``) and ``s_j`` its standard deviation in angstrom.
* A voxel map of the GMM holds ``M`` sampled at voxel centres (:func:`gmmrefine.gmm.render.render_map`).
* A 2D projection is the sum of that voxel map along z, i.e. ``(1 / apix) * integral M dz`` sampled at
  pixel centres (:func:`gmmrefine.gmm.render.render_image`).
* Its discrete Fourier transform (``rfft2_centered`` layout) at frequency ``k`` (1/A) is
  ``sum_j A_j (2 pi)^{3/2} s_j^3 / apix^3 * exp(-2 pi^2 s_j^2 |k|^2) * exp(-2 pi i k . p_j)``,
  with ``p_j`` the image position in angstrom (:mod:`gmmrefine.gmm.project`). The 3D transform of
  the voxel map has the same form (central-slice theorem), which is what map fitting uses.

So a GMM and a voxel map of the same density agree in scale in real space (per voxel / per pixel)
and in Fourier space, up to the aliasing of Gaussians narrower than a pixel.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.io.atomic import atomic_path


@dataclass
class GaussianMixture:
    """N isotropic 3D Gaussians.

    Attributes:
        centers_A: ``(N, 3)`` x, y, z in angstrom relative to the box centre.
        amplitudes: ``(N,)`` peak densities (map units).
        widths_A: ``(N,)`` standard deviations in angstrom (> 0).
    """

    centers_A: torch.Tensor
    amplitudes: torch.Tensor
    widths_A: torch.Tensor

    def __post_init__(self) -> None:
        c, a, s = self.centers_A, self.amplitudes, self.widths_A
        if c.ndim != 2 or c.shape[1] != 3:
            raise InputError(f"GaussianMixture: centers_A must have shape (N, 3), got {tuple(c.shape)}.")
        n = c.shape[0]
        if a.shape != (n,) or s.shape != (n,):
            raise InputError(f"GaussianMixture: amplitudes and widths_A must have shape ({n},), got "
                             f"{tuple(a.shape)} and {tuple(s.shape)}.")
        with torch.no_grad():
            if not (torch.isfinite(c).all() and torch.isfinite(a).all() and torch.isfinite(s).all()):
                raise InputError("GaussianMixture: centers_A, amplitudes and widths_A must be finite "
                                 "(found NaN or infinity).")
            if n and not bool((s > 0).all()):
                raise InputError("GaussianMixture: widths_A must be positive.")

    @property
    def n(self) -> int:
        return int(self.centers_A.shape[0])

    @property
    def device(self) -> torch.device:
        return self.centers_A.device

    def to(self, device=None, dtype=None) -> GaussianMixture:
        return GaussianMixture(self.centers_A.to(device=device, dtype=dtype),
                               self.amplitudes.to(device=device, dtype=dtype),
                               self.widths_A.to(device=device, dtype=dtype))

    def detach(self) -> GaussianMixture:
        return GaussianMixture(self.centers_A.detach().clone(), self.amplitudes.detach().clone(),
                               self.widths_A.detach().clone())

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``centers_A``, ``amplitudes``, ``widths_A`` (float32) to an ``.npz`` file atomically."""
        arrays = {k: getattr(self, k).detach().cpu().to(torch.float32).numpy()
                  for k in ("centers_A", "amplitudes", "widths_A")}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> GaussianMixture:
        """Read a GMM written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path) as data:
                arrays = {k: torch.as_tensor(np.asarray(data[k], dtype=np.float32), device=device)
                          for k in ("centers_A", "amplitudes", "widths_A")}
        except FileNotFoundError as exc:
            raise InputError(f"{path}: GMM file not found.", path=str(path)) from exc
        except KeyError as exc:
            raise InputError(f"{path}: GMM .npz lacks the array {exc}; expected centers_A, amplitudes, "
                             "widths_A.", path=str(path)) from exc
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable GMM .npz file ({exc}).", path=str(path)) from exc
        try:
            return cls(**arrays)
        except InputError as exc:
            raise InputError(f"{path}: {exc}", path=str(path)) from exc

    def _structure(self, origin_A: tuple[float, float, float]):
        import gemmi

        c = self.centers_A.detach().cpu().to(torch.float64).numpy() + np.asarray(origin_A, dtype=np.float64)
        a = self.amplitudes.detach().cpu().to(torch.float64).numpy()
        s = self.widths_A.detach().cpu().to(torch.float64).numpy()
        peak = float(a.max()) if a.size and a.max() > 0 else 1.0
        occupancy = np.clip(a / peak, 0.0, 1.0)
        bfactor = 8 * math.pi**2 * s**2
        structure = gemmi.Structure()
        structure.name = "GMM"
        structure.cell = gemmi.UnitCell(1, 1, 1, 90, 90, 90)
        model = gemmi.Model("1")  # type: ignore[arg-type]  # gemmi < 0.7 takes a name; 0.7 converts "1"
        per_chain = 9999  # PDB residue numbers have four digits
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        for start in range(0, len(a), per_chain):
            chain = gemmi.Chain(letters[(start // per_chain) % len(letters)])
            for j in range(start, min(start + per_chain, len(a))):
                res = gemmi.Residue()
                res.name = "GMM"
                res.seqid = gemmi.SeqId(j - start + 1, " ")
                atom = gemmi.Atom()
                atom.name = "C"
                atom.element = gemmi.Element("C")
                atom.pos = gemmi.Position(*c[j])
                atom.occ = float(occupancy[j])
                atom.b_iso = float(bfactor[j])
                res.add_atom(atom)
                chain.add_residue(res)
            model.add_chain(chain)
        structure.add_model(model)
        structure.setup_entities()
        return structure

    def to_pdb(self, path: str | os.PathLike, *, box: int | None = None, apix: float | None = None) -> None:
        """Write the Gaussians as pseudo-atoms (carbon, residue ``GMM``) to a PDB file atomically.

        B-factor = ``8 pi^2 s^2``, occupancy = amplitude / largest amplitude. With ``box`` and ``apix``
        the coordinates are shifted by ``(box // 2) * apix`` so they overlay the map in ChimeraX/Coot
        (map origin at its corner); without them they are relative to the box centre.
        """
        structure = self._structure(_origin(box, apix))
        with atomic_path(path) as tmp:
            structure.write_pdb(str(tmp))

    def to_mmcif(self, path: str | os.PathLike, *, box: int | None = None, apix: float | None = None) -> None:
        """As :meth:`to_pdb`, in mmCIF (no limit on the number of Gaussians per chain)."""
        structure = self._structure(_origin(box, apix))
        with atomic_path(path) as tmp:
            structure.make_mmcif_document().write_file(str(tmp))

    # ---- rendering -----------------------------------------------------------------------------
    def render_map(self, box: int, apix: float) -> torch.Tensor:
        """``(D, D, D)`` voxel map ``[z, y, x]``; see :func:`gmmrefine.gmm.render.render_map`."""
        from gmmrefine.gmm.render import render_map

        return render_map(self, box, apix)

    def render_image(self, box: int, apix: float, rotations: torch.Tensor | None = None,
                     translation_px: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D, D)`` projections ``[y, x]``; see :func:`gmmrefine.gmm.render.render_image`."""
        from gmmrefine.gmm.render import render_image

        return render_image(self, box, apix, rotations, translation_px)


def _origin(box: int | None, apix: float | None) -> tuple[float, float, float]:
    if box is None or apix is None:
        return (0.0, 0.0, 0.0)
    o = (box // 2) * float(apix)
    return (o, o, o)
