"""DDIM inversion: an image -> (through the autoencoder) its latent -> the noise x_T that DDIM
(eta = 0) maps back to it; then the reconstruction from that noise (dit_jax.sampling does the
work).

  python -m dit_jax.invert --workdir=workdir/demo --images=digit.png --labels=3 --steps=50 \\
      --output=inverted.png --noise_output=noise.npz

Images are ADM center-cropped to the model's image size. The output PNG shows each input and
its reconstruction side by side; the noise .npz holds `noise` [N, h, w, c] (NHWC) and `labels`,
ready to be edited and sampled from. Inversion is most faithful without guidance (cfg 1).
"""

import jax.numpy as jnp
import numpy as np
from absl import flags

from dit_jax import autoencoder as autoencoder_lib
from dit_jax import cli, sampling
from dit_jax.data import sources
from dit_jax.evaluation import metrics

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A training workdir: its config, autoencoder and EMA weights."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Or: a dit_jax checkpoint dir or official .pt/.safetensors/.npz."
)
_MODEL = flags.DEFINE_string("model", "DiT-XL/2", "With --checkpoint: the model name.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "With --checkpoint: the image side.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "With --checkpoint: number of classes.")
_VAE = flags.DEFINE_string(
    "vae", "stabilityai/sd-vae-ft-ema", "With --checkpoint: diffusers folder or hub id."
)
_IMAGES = flags.DEFINE_list("images", None, "Image files to invert.")
_LABELS = flags.DEFINE_list(
    "labels", None, "The class of each image (one label for all, or one per image)."
)
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_CFG_SCALE = flags.DEFINE_float(
    "cfg_scale", 1.0, "Guidance scale during inversion and reconstruction (1 = off)."
)
_GUIDANCE = flags.DEFINE_enum(
    "guidance",
    None,
    list(sampling.GUIDANCE),
    "Guided channels (see dit_jax.sample); default: the run's configured guidance.",
)
_OUTPUT = flags.DEFINE_string(
    "output", "inverted.png", "PNG: inputs (left) and reconstructions (right)."
)
_NOISE_OUTPUT = flags.DEFINE_string("noise_output", None, "Also write the inverted noise (.npz).")


def main(argv):
    if not _IMAGES.value:
        raise ValueError("--images is required (one or more image files).")
    if _WORKDIR.value:
        g = sampling.generator_from_workdir(_WORKDIR.value)
    elif _CHECKPOINT.value:
        g = sampling.generator_from_checkpoint(
            _CHECKPOINT.value,
            model_name=_MODEL.value,
            image_size=_IMAGE_SIZE.value,
            num_classes=_NUM_CLASSES.value,
            vae=_VAE.value,
        )
    else:
        raise ValueError("give --workdir (a training run) or --checkpoint.")
    ae = autoencoder_lib.load_autoencoder(g.autoencoder_spec)
    images = sources.load_image_files(_IMAGES.value, g.image_size, ae.channels)
    try:
        labels = [int(v) for v in (_LABELS.value or [])]
    except ValueError:
        raise ValueError(f"--labels must be integers, got {_LABELS.value}.") from None
    if len(labels) == 1:
        labels = labels * len(images)
    if len(labels) != len(images):
        raise ValueError(
            f"give one label, or one per image: {len(images)} images, labels {_LABELS.value}."
        )
    if min(labels) < 0 or max(labels) >= g.model.num_classes:
        raise ValueError(
            f"--labels must be in [0, {g.model.num_classes - 1}], got {_LABELS.value}."
        )
    mean, _ = ae.encode_moments(images)
    noise, recon = sampling.invert_latents(
        g.model,
        g.params,
        jnp.asarray(mean * g.scaling_factor),
        jnp.asarray(labels, jnp.int32),
        steps=_STEPS.value,
        cfg_scale=_CFG_SCALE.value,
        guidance_channels=sampling.guidance_channels(_GUIDANCE.value or g.guidance),
        clip_denoised=g.pixel_space,
        **g.schedule,
    )
    decoded = sampling.images_to_uint8(
        sampling.latent_decoder(ae, g.scaling_factor, g.image_size)(recon)
    )
    pairs = np.stack([images, decoded], axis=1).reshape(-1, *images.shape[1:])
    sampling.save_png(sampling.make_grid(pairs, ncol=2), _OUTPUT.value)
    if _NOISE_OUTPUT.value:
        np.savez(_NOISE_OUTPUT.value, noise=np.asarray(noise), labels=np.asarray(labels, np.int32))
    for path, value in zip(_IMAGES.value, metrics.psnr(images, decoded)):
        print(f"{path}: reconstruction PSNR {value:.1f} dB")
    print(
        f"-> {_OUTPUT.value}" + (f", noise -> {_NOISE_OUTPUT.value}" if _NOISE_OUTPUT.value else "")
    )


if __name__ == "__main__":
    cli.run(main)
