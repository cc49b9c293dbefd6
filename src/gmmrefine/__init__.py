"""gmmrefine: refine cryo-EM particle poses against Gaussian mixture models.

Data flow: io -> geometry/fourier -> reconstruct -> gmm -> refine -> hetero -> pipeline -> cli.
"""

__version__ = "0.1.0"
