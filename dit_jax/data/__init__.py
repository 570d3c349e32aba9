"""Image sources, latent encoding (TFDS ArrayRecord) and the training input pipeline."""
