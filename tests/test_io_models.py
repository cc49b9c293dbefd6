"""Atomic models: CHARMM-style PDB without element column, explicit elements, mmCIF, bad files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gemmi
import numpy as np
import pytest

from gmmrefine.errors import InputError
from gmmrefine.io.models import infer_element, read_atoms


def _residue_names(pdb_path) -> Counter:
    residues = {}
    for line in Path(pdb_path).read_text().splitlines():
        if line.startswith("ATOM"):
            residues[(line[21], line[22:27])] = line[17:21].strip()
    return Counter(residues.values())


def test_charmm_pdb_elements_are_inferred(adk_open_pdb):
    atoms = read_atoms(adk_open_pdb)
    lines = [line for line in Path(adk_open_pdb).read_text().splitlines() if line.startswith("ATOM")]
    assert len(atoms) == len(lines) == 3341
    assert atoms.coords_A.dtype == np.float64 and atoms.coords_A.shape == (3341, 3)
    np.testing.assert_allclose(atoms.coords_A[0], [float(lines[0][30:38]), float(lines[0][38:46]),
                                                   float(lines[0][46:54])])
    counts = Counter(atoms.elements)
    assert set(counts) == {"C", "N", "O", "S", "H"}
    residues = _residue_names(adk_open_pdb)
    assert counts["S"] == residues["MET"] + residues["CYS"]  # SD of Met, SG of Cys
    by_name = dict(zip(atoms.names, atoms.elements))
    assert (by_name["HG1"], by_name["CA"], by_name["OD1"], by_name["SD"], by_name["NZ"]) == ("H", "C", "O", "S", "N")
    # Hydrogens are exactly the atoms whose CHARMM name starts with H.
    np.testing.assert_array_equal(atoms.is_hydrogen, [n.startswith("H") for n in atoms.names])
    assert atoms.residue_numbers[0] == int(lines[0][22:26]) and atoms.residue_numbers[-1] == int(lines[-1][22:26])
    assert len(np.unique(atoms.residue_numbers)) == sum(residues.values())
    heavy = atoms.heavy()
    assert len(heavy) == 3341 - int(atoms.is_hydrogen.sum()) and not heavy.is_hydrogen.any()
    assert len(heavy.residue_numbers) == len(heavy)


def test_explicit_elements_and_mmcif(tmp_path):
    pdb = tmp_path / "small.pdb"
    pdb.write_text(
        "ATOM      1  CA  ALA A   1      11.000  12.000  13.000  1.00 10.00           C\n"
        "ATOM      2  HA  ALA A   1      11.500  12.000  13.000  1.00 10.00           H\n"
        "HETATM    3 CA    CA A 101       1.000   2.000   3.000  1.00 10.00          CA\n"
        "HETATM    4 ZN    ZN A 102       4.000   5.000   6.000  1.00 10.00          ZN\n"
        "END\n")
    atoms = read_atoms(pdb)
    assert atoms.elements == ["C", "H", "Ca", "Zn"]
    np.testing.assert_array_equal(atoms.is_hydrogen, [False, True, False, False])
    structure = gemmi.read_structure(str(pdb))
    structure.setup_entities()
    cif = tmp_path / "small.cif"
    structure.make_mmcif_document().write_file(str(cif))
    from_cif = read_atoms(cif)
    assert from_cif.elements == atoms.elements
    np.testing.assert_allclose(from_cif.coords_A, atoms.coords_A)


def test_infer_element_rules():
    assert infer_element("1HB", "ALA") == "H"
    assert infer_element("OH2", "TIP3") == "O"
    assert infer_element("ZN", "ZN") == "Zn"
    assert infer_element("CL1", "LIG") == "Cl"
    assert infer_element("C12", "LIG") == "C"


def test_empty_model_is_input_error(tmp_path):
    empty = tmp_path / "empty.pdb"
    empty.write_text("REMARK nothing here\nEND\n")
    with pytest.raises(InputError, match=r"empty\.pdb: the model file has no atoms"):
        read_atoms(empty)
    with pytest.raises(InputError, match=r"missing\.pdb: model file not found"):
        read_atoms(tmp_path / "missing.pdb")
