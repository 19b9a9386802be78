"""hpcbrain: self-supervised representation learning of 3D brain MRI at HPC scale."""

__version__ = "0.1.0"
