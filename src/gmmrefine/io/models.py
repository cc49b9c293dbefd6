"""Atomic models (PDB, mmCIF) via gemmi.

Only the first model of the file is used. Elements come from the element column (PDB columns 77-78,
mmCIF ``type_symbol``); where it is empty, as in CHARMM/NAMD PDB files (the bundled
``adk_*.pdb``), they are inferred from the atom name: in standard residues (amino acids, nucleic
acids, water) the first letter after any leading digits (``HG1`` -> H, ``CA`` -> C, ``OD1`` -> O,
``1HB`` -> H); in other residues a two-letter element when the name is one (``ZN``, ``MG``, ``CL``)
and the residue is that ion, else the first letter. gemmi's own guess from the name columns is not
used because it reads CHARMM names as two-letter elements (``HG1`` -> Hg, ``CD1`` -> Cd).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from gmmrefine.errors import InputError

_WATER = {"HOH", "WAT", "TIP3", "TIP", "SOL", "H2O", "DOD", "TIP3P"}
# Residue names that are single ions (the atom name is the element).
_ION_ELEMENTS = {"ZN", "MG", "CA", "NA", "CL", "FE", "MN", "CU", "CO", "NI", "CD", "HG", "K", "LI", "BR", "IOD", "I",
                 "SE", "SR", "BA", "CS", "RB", "AL", "GA", "PT", "AU", "AG", "PB", "YB", "SM", "EU", "GD", "TB"}


@dataclass
class Atoms:
    """Atoms of a model.

    Attributes:
        coords_A: ``(N, 3)`` float64 x, y, z in angstrom (model coordinates).
        elements: ``N`` element symbols, capitalised (``"C"``, ``"Zn"``).
        is_hydrogen: ``(N,)`` bool, hydrogen or deuterium.
        names: ``N`` atom names as in the file (``"CA"``, ``"HG1"``).
        residue_numbers: ``(N,)`` int64 residue sequence numbers.
        chain_ids: ``N`` chain names.
    """

    coords_A: np.ndarray
    elements: list[str]
    is_hydrogen: np.ndarray
    names: list[str]
    residue_numbers: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chain_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.elements)

    def heavy(self) -> Atoms:
        """The non-hydrogen atoms."""
        keep = ~self.is_hydrogen
        return Atoms(self.coords_A[keep], [e for e, k in zip(self.elements, keep) if k], self.is_hydrogen[keep],
                     [n for n, k in zip(self.names, keep) if k], self.residue_numbers[keep],
                     [c for c, k in zip(self.chain_ids, keep) if k])


def infer_element(atom_name: str, residue_name: str) -> str:
    """Element symbol from an atom name, for files whose element column is empty."""
    name = atom_name.strip().upper()
    letters = re.sub(r"[^A-Z]", "", name)
    if not letters:
        return "X"
    res = residue_name.strip().upper()
    info = gemmi.find_tabulated_residue(res)
    standard = res in _WATER or (info is not None and (info.is_amino_acid() or info.is_nucleic_acid()))
    if not standard:
        if res in _ION_ELEMENTS and letters in _ION_ELEMENTS and letters == res:
            return letters.capitalize() if letters != "IOD" else "I"
        if name[:2] in ("CL", "BR") and not name[:1].isdigit():
            return name[:2].capitalize()
    first = letters[0]
    return "H" if first == "D" and standard else first


def read_atoms(path: str | os.PathLike) -> Atoms:
    """Read the first model of a PDB or mmCIF file.

    Raises:
        InputError: missing or unreadable file, or a model without atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found.", path=str(path))
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own wording
        raise InputError(f"{path}: cannot read the atomic model ({exc}); expected PDB or mmCIF.",
                         path=str(path)) from exc
    if len(structure) == 0:
        raise InputError(f"{path}: the model file has no atoms; expected ATOM/HETATM records.", path=str(path),
                         field="atoms")
    explicit = _explicit_elements(path, structure)
    coords, elements, names, residues, chains = [], [], [], [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                pos = atom.pos
                coords.append((pos.x, pos.y, pos.z))
                names.append(atom.name)
                residues.append(residue.seqid.num)
                chains.append(chain.name)
                if explicit:
                    elements.append(atom.element.name)
                else:
                    elements.append(infer_element(atom.name, residue.name))
    if not coords:
        raise InputError(f"{path}: the model file has no atoms; expected ATOM/HETATM records.", path=str(path),
                         field="atoms")
    is_h = np.array([e.upper() in ("H", "D") for e in elements], dtype=bool)
    return Atoms(np.asarray(coords, dtype=np.float64), elements, is_h, names,
                 np.asarray(residues, dtype=np.int64), chains)


def _explicit_elements(path: Path, structure: gemmi.Structure) -> bool:
    """True when the file states every atom's element (mmCIF type_symbol, PDB columns 77-78)."""
    if structure.input_format != gemmi.CoorFormat.Pdb:
        return True
    with open(path, errors="replace") as fh:
        for line in fh:
            if line.startswith(("ATOM  ", "HETATM")):
                if not line[76:78].strip():
                    return False
            elif line.startswith("ENDMDL"):
                break
    return True
