"""Rotations (RELION ZYZ Euler angles, axis-angle updates) and symmetry groups."""
