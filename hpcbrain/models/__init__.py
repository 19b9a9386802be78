"""Network architectures (no training logic: that lives in `hpcbrain.methods`)."""
from hpcbrain.models.autoencoder import ConvAutoencoder, LSORDecoder, LSOREncoder, latent_shape

__all__ = ["ConvAutoencoder", "LSORDecoder", "LSOREncoder", "latent_shape"]
