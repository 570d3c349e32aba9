"""A TFDS builder for latent datasets (no download step).

  builder = LatentDataset(source="embedded", autoencoder="identity:32", image_size=28,
                          data_dir="~/tensorflow_datasets")
  builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source()["train"]

It writes the same examples as `python -m dit_jax.data.encode` (features in
`latents.latent_features`); the CLI adds sharding over processes and shard-level resume.
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from dit_jax import autoencoder as autoencoder_lib
from dit_jax.data import latents, sources


class LatentDataset(tfds.core.GeneratorBasedBuilder):
    """VAE posteriors (image and horizontal flip) of a labeled image source."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Posterior mean/logvar of image and flip, float16."}

    def __init__(
        self, *, source: str, autoencoder: str, image_size: int, batch_size: int = 64, **kwargs
    ):
        self._source_spec, self._image_size, self._batch_size = source, image_size, batch_size
        self._source = sources.open_source(source)
        self._autoencoder = autoencoder_lib.load_autoencoder(autoencoder)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: dataset_info_from_configs needs the builder to live in a package of its own.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Latents of {self._source_spec} at {self._image_size}px via {self._autoencoder.spec}.",
            features=latents.latent_features(
                self._autoencoder.latent_shape(self._image_size), self._source.class_names
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for unit in self._source.units():
            yield from latents.encode_examples(
                self._source.examples(unit),
                self._autoencoder,
                self._image_size,
                batch_size=self._batch_size,
            )
