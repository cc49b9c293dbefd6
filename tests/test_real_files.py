"""Files written by RELION, cryoSPARC and EMPIAR depositors (``tests/data/real``, provenance in its
README): each is read as RELION reads it, or refused with one sentence naming the file, the field and
what was expected."""

import warnings
from pathlib import Path

import numpy as np
import pytest

from gmmrefine.errors import InputError
from gmmrefine.io.mrc import open_stack, stack_apix
from gmmrefine.io.particles import read_images, read_particles

REAL = Path(__file__).parent / "data" / "real"

# file: (n, box, apix) when read, else (what the refusal names: the field, and a phrase of the expectation)
EXPECTED = {
    "relion31.star": (5, 256, 2.806),
    "relion31.v2.star": (5, 256, 2.806),
    "relion31.6opticsgroups.star": ("rlnImagePixelSize", "one pixel size"),
    "empiar_10076_7.star": ("rlnAngleRot", "particle orientation"),
    "empiar_10076_7.cs": ("alignments3D/pose", "export particles from a refinement job"),
    "cryosparc_J2_particles_exported.cs": ("alignments3D/pose", "export particles from a refinement job"),
    "cryosparc_P12_J24_001_particles.cs": ("blob/path", "not found"),
    "FinalRefinement-OriginalParticles-PfCRT.star": ("rlnImageName", "not found"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_is_read_or_refused_in_one_sentence(name):
    expected = EXPECTED[name]
    if isinstance(expected[0], int):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            ps = read_particles(REAL / name)
        assert (len(ps), ps.box, ps.apix) == pytest.approx(expected)
        assert ps.has_ctf and np.isfinite(ps.angles_deg).all()
        return
    with pytest.raises(InputError) as err:
        read_particles(REAL / name)
    message = str(err.value)
    field, phrase = expected
    assert message.startswith(str(REAL / name)) and field in message and phrase in message, message
    assert message.count(". ") <= 1 and "\n" not in message  # one sentence


def test_stack_without_map_id_is_read_with_one_warning():
    """relion31.mrcs has no 'MAP ' id string in its header (older writers); RELION 3.1 reads it."""
    from gmmrefine.io import mrc

    mrc._WARNED.discard(str(REAL / "relion31.mrcs"))
    with pytest.warns(UserWarning, match="no 'MAP ' id string") as record:
        stack = open_stack(REAL / "relion31.mrcs")
        open_stack(REAL / "relion31.mrcs")
    assert len([w for w in record if "MAP" in str(w.message)]) == 1
    assert stack.shape == (5, 256, 256) and stack_apix(REAL / "relion31.mrcs") == 1.0  # header unset: 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ps = read_particles(REAL / "relion31.star")
        images = read_images(ps, np.arange(5))
    assert images.shape == (5, 256, 256) and np.isfinite(images).all() and images.std() > 0
    assert np.array_equal(images[2], np.asarray(stack[ps.image_index[2]], dtype=np.float32))


def test_missing_ctf_columns_take_relions_defaults():
    """The PfCRT STAR (RELION 3.0.6) has no rlnAmplitudeContrast: RELION takes 0 (CTF::read); so do we,
    with a warning, and then name the stack that is not there."""
    with pytest.warns(UserWarning, match="rlnAmplitudeContrast = 0"):
        with pytest.raises(InputError, match="Extract/job012/FinalRefinement-OriginalParticles-PfCRT.mrcs"):
            read_particles(REAL / "FinalRefinement-OriginalParticles-PfCRT.star")


def test_empiar_stack_reads():
    stack = open_stack(REAL / "empiar_10076_7.mrc")
    assert stack.shape == (7, 320, 320) and np.isfinite(np.asarray(stack[:], dtype=np.float32)).all()
