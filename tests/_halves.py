"""The gold-standard tests' second data set: the same simulation with every half-2 image changed."""

import shutil
from pathlib import Path

import numpy as np

from gmmrefine.io.mrc import open_stack, write_stack
from gmmrefine.io.particles import read_particles


def copy_with_half2_changed(sim: Path, dst: Path, seed: int, star: str = "particles_perturbed.star") -> Path:
    """Copy the simulation folder ``sim`` to ``dst`` and add noise (one standard deviation of the stack)
    to every image of half set 2 in ``dst/particles.mrcs``; returns ``dst``."""
    shutil.copytree(sim, dst)
    ps = read_particles(dst / star)
    stack = np.array(open_stack(dst / "particles.mrcs"), dtype=np.float32)
    rows = ps.image_index[ps.subset == 2]
    stack[rows] += np.random.default_rng(seed).normal(0, stack.std(), stack[rows].shape).astype(np.float32)
    write_stack(dst / "particles.mrcs", stack, ps.apix)
    return dst
