"""MRC maps and stacks: validity, exact round trips, atomic writes, bad files."""

from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest

from gmmrefine.errors import InputError
from gmmrefine.io.mrc import (
    StackWriter,
    open_stack,
    read_map,
    require_cubic,
    stack_apix,
    stack_shape,
    write_map,
    write_stack,
)


def test_write_map_is_valid_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((24, 24, 24)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_map(path, data, 1.37)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    with mrcfile.open(path) as mrc:
        assert mrc.data.dtype == np.float32
        assert mrc.is_volume()
        assert float(mrc.voxel_size.x) == pytest.approx(1.37, rel=1e-6)
        assert tuple(float(v) for v in mrc.header.origin.item()) == (0.0, 0.0, 0.0)
    back, apix = read_map(path)
    assert apix == pytest.approx(1.37, rel=1e-6)
    np.testing.assert_array_equal(back, data)
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]  # no temp file left behind


def test_require_cubic(tmp_path):
    require_cubic(np.zeros((4, 4, 4)), "m.mrc")
    with pytest.raises(InputError, match="m.mrc.*cubic"):
        require_cubic(np.zeros((4, 4, 5)), "m.mrc")


def test_stack_round_trip_and_header_only_queries(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.standard_normal((7, 16, 16)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_stack(path, images, 2.5)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    assert stack_shape(path) == (7, 16, 16)
    assert stack_apix(path) == pytest.approx(2.5)
    stack = open_stack(path)
    assert stack.shape == (7, 16, 16)
    np.testing.assert_array_equal(np.asarray(stack[[5, 1]]), images[[5, 1]])
    with pytest.raises(ValueError):
        stack[0, 0, 0] = 1.0  # read-only map


def test_single_image_is_a_stack_of_one(tmp_path):
    path = tmp_path / "one.mrc"
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    with mrcfile.new(path) as mrc:
        mrc.set_data(image)
    assert stack_shape(path) == (1, 8, 8)
    np.testing.assert_array_equal(open_stack(path)[0], image)


def test_stack_writer_chunks_and_header_stats(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.standard_normal((50, 12, 12)).astype(np.float32)
    path = tmp_path / "big.mrcs"
    with StackWriter(path, n=50, box=12, apix=1.1) as out:
        assert not path.exists()  # only the temporary file exists while writing
        for i0 in range(0, 50, 16):
            out[i0:i0 + 16] = images[i0:i0 + 16]
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    np.testing.assert_array_equal(open_stack(path)[:], images)
    with mrcfile.open(path, header_only=True) as mrc:
        assert float(mrc.header.dmin) == pytest.approx(images.min())
        assert float(mrc.header.dmax) == pytest.approx(images.max())
        assert float(mrc.header.dmean) == pytest.approx(images.mean(), abs=1e-6)
        assert float(mrc.header.rms) == pytest.approx(images.std(), rel=1e-5)
        assert float(mrc.voxel_size.x) == pytest.approx(1.1)
    assert [p.name for p in tmp_path.iterdir()] == ["big.mrcs"]


def test_stack_writer_interrupted_leaves_nothing(tmp_path):
    path = tmp_path / "big.mrcs"
    with pytest.raises(RuntimeError, match="simulated crash"):
        with StackWriter(path, n=10, box=8, apix=1.0) as out:
            out[0:5] = np.ones((5, 8, 8))
            raise RuntimeError("simulated crash")
    assert list(tmp_path.iterdir()) == []


def test_truncated_mrc_is_input_error(tmp_path):
    path = tmp_path / "cut.mrcs"
    write_stack(path, np.ones((10, 16, 16), dtype=np.float32), 1.0)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 500)
    for reader in (stack_shape, open_stack, read_map):
        with pytest.raises(InputError, match=r"cut\.mrcs.*truncated") as info:
            reader(path)
        assert info.value.path == str(path)


def test_not_an_mrc_is_input_error(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_bytes(b"hello" * 400)
    with pytest.raises(InputError, match=r"notes\.mrc.*not a readable MRC"):
        read_map(path)
    with pytest.raises(InputError, match=r"missing\.mrc.*not found"):
        read_map(tmp_path / "missing.mrc")
