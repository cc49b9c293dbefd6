"""Fourier helpers, CTF, masks, filters, FSC/FRC and resolution."""
