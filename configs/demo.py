"""A small class-conditional DiT on the embedded MNIST 5k in pixel space at 16x16 (ADM crop of
the 28px digits; identity autoencoder), sized for 2 CPU cores: about ten minutes.

  python -m dit_jax.main --config=configs/demo.py --workdir=workdir/demo
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.name = ""
    c.model.depth = 4
    c.model.hidden_size = 256
    c.model.num_heads = 4
    c.model.patch_size = 8              # 4 tokens: on 2 cores, width buys more than tokens do
    c.model.dtype = "float32"           # bf16 matmuls are slower than fp32 on most CPUs
    c.data.dir = "embedded"             # built on first use (a second)
    c.data.image_size = 16             # 4 tokens of 8x8 pixels: ~10 steps/s on 2 cores
    c.data.random_flip = False          # mirrored digits are not digits
    c.diffusion.noise_schedule = "cosine"  # the linear one wastes most steps on near-noise at 16px
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"     # a short run ends sharper on a decayed learning rate
    c.optimizer.warmup_steps = 100
    c.optimizer.grad_clip = 1.0
    c.batch_size = 64
    c.num_train_steps = 5_000
    c.ema_decay = 0.999
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1_000
    c.keep_checkpoints = 2
    c.keep_every_steps = 0
    c.sample.every_steps = 1_000
    c.sample.num_per_class = 8
    c.sample.classes = tuple(range(10))
    c.sample.sampler = "ddpm"
    c.sample.steps = 250
    c.sample.cfg_scale = 4.0
    c.sample.guidance = "all"           # 1 channel: guide it (the official variant guides channels 0-2)
    c.sample.clip_denoised = True       # pixel space
    c.sample.autoencoder = "identity:16"
    return c
