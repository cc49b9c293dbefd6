"""File formats: MRC maps and stacks, RELION STAR, cryoSPARC .cs, atomic models."""
