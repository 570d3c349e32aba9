"""The diffusers DiT format, both ways: `DiTTransformer2DModel` folders and `DiTPipeline` folders.

A diffusers DiT folder is config.json + diffusion_pytorch_model.safetensors; a pipeline folder
(model_index.json) keeps it in `transformer/`, next to `vae/` and `scheduler/`. Its weights are
the official ones under other names (diffusers' scripts/convert_dit_to_diffusers.py):

  x_embedder.proj                  pos_embed.proj
  t_embedder.mlp.0 / mlp.2         transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / _2
  y_embedder.embedding_table       transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
                                   (both embedders copied into every block i; block 0's feeds the
                                   final layer)
  blocks.{i}.adaLN_modulation.1    transformer_blocks.{i}.norm1.linear
  blocks.{i}.attn.qkv              transformer_blocks.{i}.attn1.to_q / to_k / to_v (rows split in 3)
  blocks.{i}.attn.proj             transformer_blocks.{i}.attn1.to_out.0
  blocks.{i}.mlp.fc1 / fc2         transformer_blocks.{i}.ff.net.0.proj / ff.net.2
  final_layer.adaLN_modulation.1   proj_out_1
  final_layer.linear               proj_out_2
  pos_embed                        not stored: diffusers rebuilds the same fixed sin-cos table

Reading gives an official-layout state dict (so `param_mapping.dit_params_from_state_dict` makes
the Flax parameters) and the DiT's constructor fields. diffusers runs these weights with two
small formula differences (see `models.DIFFUSERS_FORWARD`); `diffusers_forward=True` adds the
fields that reproduce its outputs exactly, the default keeps the official forward the weights
were trained with. Writing produces what `DiTTransformer2DModel.from_pretrained` loads with
strict keys; its config's norm_eps is the model's `mlp_norm_eps`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Mapping, Optional

import numpy as np
import safetensors.numpy

from dit_jax import files, models, param_mapping, state_dicts
from dit_jax.state_dicts import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_FILE = "diffusion_pytorch_model.bin"
PIPELINE_FILE = "model_index.json"
#: The diffusers release whose format is written (and checked by tests/test_diffusers_parity.py).
DIFFUSERS_VERSION = "0.42.1"
MODEL_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: diffusers < 0.28

_SCHEDULER_COMMON = dict(
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    trained_betas=None,
    rescale_betas_zero_snr=False,
    thresholding=False,
    dynamic_thresholding_ratio=0.995,
    sample_max_value=1.0,
    steps_offset=0,
)
#: Scheduler configs for a pipeline folder, every key written (as save_config does). The DDIM
#: one is what diffusers' DiT conversion ships; note that every key being written means
#: DPMSolverMultistepScheduler.from_config(it) inherits "leading" spacing (888 ... 111 for 8
#: steps), not DPM's "linspace" default (999 ... 125).
SCHEDULER_CONFIGS = {
    "ddim": dict(
        _class_name="DDIMScheduler",
        **_SCHEDULER_COMMON,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    ),
    "dpm": dict(
        _class_name="DPMSolverMultistepScheduler",
        **_SCHEDULER_COMMON,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        final_sigmas_type="zero",
        lambda_min_clipped=float("-inf"),
        variance_type=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
        timestep_spacing="linspace",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_ENDINGS = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")  # files, not Hub ids


# ----------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------


def _linear(sd: dict, src: str, dst: str, out: dict):
    for suffix in ("weight", "bias"):
        out[f"{dst}.{suffix}"] = sd[f"{src}.{suffix}"]


def state_dict_to_diffusers(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official-layout DiT state dict -> DiTTransformer2DModel state dict (pos_embed dropped)."""
    sd = dict(sd)
    depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    out: dict[str, np.ndarray] = {}
    _linear(sd, "x_embedder.proj", "pos_embed.proj", out)
    for i in range(depth):
        b, o = f"blocks.{i}", f"transformer_blocks.{i}"
        emb = f"{o}.norm1.emb"
        _linear(sd, "t_embedder.mlp.0", f"{emb}.timestep_embedder.linear_1", out)
        _linear(sd, "t_embedder.mlp.2", f"{emb}.timestep_embedder.linear_2", out)
        out[f"{emb}.class_embedder.embedding_table.weight"] = sd[
            "y_embedder.embedding_table.weight"
        ]
        _linear(sd, f"{b}.adaLN_modulation.1", f"{o}.norm1.linear", out)
        for suffix in ("weight", "bias"):
            q, k, v = np.split(sd[f"{b}.attn.qkv.{suffix}"], 3, axis=0)
            out.update(
                {
                    f"{o}.attn1.to_q.{suffix}": q,
                    f"{o}.attn1.to_k.{suffix}": k,
                    f"{o}.attn1.to_v.{suffix}": v,
                }
            )
        _linear(sd, f"{b}.attn.proj", f"{o}.attn1.to_out.0", out)
        _linear(sd, f"{b}.mlp.fc1", f"{o}.ff.net.0.proj", out)
        _linear(sd, f"{b}.mlp.fc2", f"{o}.ff.net.2", out)
    _linear(sd, "final_layer.adaLN_modulation.1", "proj_out_1", out)
    _linear(sd, "final_layer.linear", "proj_out_2", out)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


_BLOCK_LINEARS = (
    "norm1.emb.timestep_embedder.linear_1",
    "norm1.emb.timestep_embedder.linear_2",
    "norm1.linear",
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


def diffusers_keys(depth: int) -> set[str]:
    """Every key an adaLN-Zero DiTTransformer2DModel of this depth holds."""
    ends = ("weight", "bias")
    keys = {f"{n}.{s}" for n in ("pos_embed.proj", "proj_out_1", "proj_out_2") for s in ends}
    for i in range(depth):
        keys |= {f"transformer_blocks.{i}.{n}.{s}" for n in _BLOCK_LINEARS for s in ends}
        keys.add(f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight")
    return keys


def state_dict_from_diffusers(
    dsd: Mapping[str, np.ndarray], input_size: int, *, source: str = "diffusers weights"
) -> dict[str, np.ndarray]:
    """DiTTransformer2DModel state dict -> official layout, with the fixed sin-cos pos_embed for
    `input_size` (latent side). The per-block embedder copies must agree (they do in every
    converted checkpoint); the official layout has one."""
    dsd = {k: np.asarray(v) for k, v in dsd.items()}
    blocks = {
        int(m.group(1)) for k in dsd for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m
    }
    if not blocks or "pos_embed.proj.weight" not in dsd:
        raise CheckpointError(
            f"{source}: not a DiTTransformer2DModel state dict (no "
            "transformer_blocks.* / pos_embed.proj.weight)."
        )
    depth = max(blocks) + 1
    expected = diffusers_keys(depth)
    missing, unexpected = sorted(expected - set(dsd)), sorted(set(dsd) - expected)
    if missing or unexpected:
        lines = [f"{source}: not the keys of an adaLN-Zero DiTTransformer2DModel of depth {depth}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): "
                    + ", ".join(keys[:12])
                    + (f" ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                )
        raise CheckpointError("\n".join(lines))
    f32 = {k: v.astype(np.float32) for k, v in dsd.items()}
    emb = "transformer_blocks.{}.norm1.emb."
    for name in (
        "timestep_embedder.linear_1",
        "timestep_embedder.linear_2",
        "class_embedder.embedding_table",
    ):
        for s in ("weight", "bias") if "linear" in name else ("weight",):
            key = f"{name}.{s}"
            first = f32[emb.format(0) + key]
            differ = [
                i for i in range(1, depth) if not np.array_equal(f32[emb.format(i) + key], first)
            ]
            if differ:
                raise CheckpointError(
                    f"{source}: the per-block copies of {key} differ (blocks {differ} vs 0); the "
                    "official layout has one timestep and one class embedder, so this model cannot "
                    "be represented."
                )
    sd: dict[str, np.ndarray] = {}
    _linear(f32, "pos_embed.proj", "x_embedder.proj", sd)
    e0 = emb.format(0)
    _linear(f32, e0 + "timestep_embedder.linear_1", "t_embedder.mlp.0", sd)
    _linear(f32, e0 + "timestep_embedder.linear_2", "t_embedder.mlp.2", sd)
    sd["y_embedder.embedding_table.weight"] = f32[e0 + "class_embedder.embedding_table.weight"]
    for i in range(depth):
        b, o = f"blocks.{i}", f"transformer_blocks.{i}"
        _linear(f32, f"{o}.norm1.linear", f"{b}.adaLN_modulation.1", sd)
        for s in ("weight", "bias"):
            sd[f"{b}.attn.qkv.{s}"] = np.concatenate([f32[f"{o}.attn1.to_{n}.{s}"] for n in "qkv"])
        _linear(f32, f"{o}.attn1.to_out.0", f"{b}.attn.proj", sd)
        _linear(f32, f"{o}.ff.net.0.proj", f"{b}.mlp.fc1", sd)
        _linear(f32, f"{o}.ff.net.2", f"{b}.mlp.fc2", sd)
    _linear(f32, "proj_out_1", "final_layer.adaLN_modulation.1", sd)
    _linear(f32, "proj_out_2", "final_layer.linear", sd)
    hidden, _, patch, _ = sd["x_embedder.proj.weight"].shape
    sd["pos_embed"] = models.sincos_2d(hidden, input_size // patch).astype(np.float32)[None]
    return sd


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------


def model_kwargs_from_config(
    config: Mapping, *, diffusers_forward: bool = False, mlp_ratio: float = 4.0
) -> dict:
    """DiT constructor fields from a DiTTransformer2DModel (or old Transformer2DModel) config."""
    cls = config.get("_class_name")
    if cls not in MODEL_CLASSES:
        raise CheckpointError(
            f"a diffusers config of class {cls!r}; expected one of {MODEL_CLASSES}."
        )
    want = dict(
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        norm_elementwise_affine=False,
        attention_bias=True,
    )
    bad = [
        f"{k}={config.get(k, '(unset)')!r} (need {v!r})"
        for k, v in want.items()
        if config.get(k, v) != v
    ]
    if bad or not config.get("patch_size") or not config.get("num_embeds_ada_norm"):
        raise CheckpointError(
            "not a class-conditional adaLN-Zero DiT config: "
            + (", ".join(bad) or "patch_size / num_embeds_ada_norm unset")
            + "."
        )
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    in_ch = int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"out_channels {out_ch} is neither in_channels {in_ch} nor twice it.")
    kwargs = dict(
        input_size=int(config["sample_size"]),
        patch_size=int(config["patch_size"]),
        in_channels=in_ch,
        hidden_size=heads * head_dim,
        depth=int(config["num_layers"]),
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        class_dropout_prob=0.1,
        num_classes=int(config["num_embeds_ada_norm"]),
        learn_sigma=out_ch == 2 * in_ch,
    )
    if diffusers_forward:
        kwargs.update(models.DIFFUSERS_FORWARD, mlp_norm_eps=float(config.get("norm_eps", 1e-5)))
    return kwargs


def diffusers_config(model: models.DiT) -> dict:
    """The DiTTransformer2DModel config of `model` (an adaLN-Zero DiT); norm_eps is the
    model's pre-MLP LayerNorm eps (diffusers' conversion leaves it at 1e-5)."""
    if model.block_type != "adaln_zero":
        raise ValueError(
            f"diffusers' DiT is adaLN-Zero; this model has block_type {model.block_type!r}."
        )
    if model.mlp_ratio != 4.0:
        raise ValueError(
            f"DiTTransformer2DModel has an MLP ratio of 4; this model's is {model.mlp_ratio}."
        )
    if model.class_dropout_prob <= 0:
        raise ValueError("DiTTransformer2DModel needs the null class (class_dropout_prob > 0).")
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "dropout": 0.0,
        "in_channels": model.in_channels,
        "norm_elementwise_affine": False,
        "norm_eps": float(model.mlp_norm_eps),
        "norm_num_groups": 32,
        "norm_type": "ada_norm_zero",
        "num_attention_heads": model.num_heads,
        "num_embeds_ada_norm": model.num_classes,
        "num_layers": model.depth,
        "out_channels": model.out_channels,
        "patch_size": model.patch_size,
        "sample_size": model.input_size,
        "upcast_attention": False,
    }


# ----------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------


def is_diffusers_source(path: str) -> bool:
    """A local diffusers DiT or pipeline folder, or (not a local path) a Hub id."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return any(
            os.path.isfile(os.path.join(path, *p))
            for p in [(CONFIG_FILE,), (PIPELINE_FILE,), ("transformer", CONFIG_FILE)]
        )
    return (
        not os.path.exists(path)
        and bool(_HUB_ID.match(path))
        and not path.startswith((".", "~"))
        and not path.lower().endswith(_FILE_ENDINGS)
    )


def _download(repo_id: str, revision: Optional[str]) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to download "
            "it (pip install huggingface_hub); or pass a local diffusers folder."
        ) from None
    try:
        root = None
        for weights in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):  # the .bin only without .safetensors
            names = [CONFIG_FILE, weights]
            root = huggingface_hub.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[PIPELINE_FILE] + names + [f"transformer/{n}" for n in names],
            )
            if any(os.path.isfile(os.path.join(root, *p, weights)) for p in [(), ("transformer",)]):
                break
        return root
    except Exception as e:  # offline, unknown repository, gated, network errors, ...
        raise CheckpointError(
            f"{repo_id!r} could not be downloaded from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); pass a local diffusers folder."
        ) from None


def transformer_folder(path_or_hub_id: str, *, revision: Optional[str] = None) -> str:
    """The folder holding the DiT's config.json: the folder itself or a pipeline's transformer/."""
    source = os.fspath(path_or_hub_id)
    if not os.path.isdir(source):
        if not is_diffusers_source(source):
            raise CheckpointError(f"{source}: no such folder (and not a Hugging Face Hub id).")
        source = _download(source, revision)
    if os.path.isfile(os.path.join(source, "transformer", CONFIG_FILE)):
        return os.path.join(source, "transformer")
    if os.path.isfile(os.path.join(source, CONFIG_FILE)):
        return source
    raise CheckpointError(
        f"{source}: no {CONFIG_FILE} nor transformer/{CONFIG_FILE}; not a diffusers DiT folder."
    )


def read_diffusers_dit(
    path_or_hub_id: str, *, diffusers_forward: bool = False, revision: Optional[str] = None
) -> tuple[dict[str, np.ndarray], dict]:
    """(official-layout state dict, DiT constructor fields) from a diffusers DiT folder, a
    pipeline folder (its transformer/), or a Hub id (with huggingface_hub)."""
    folder = transformer_folder(path_or_hub_id, revision=revision)
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        config = json.load(f)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(weights):
        dsd = safetensors.numpy.load_file(weights)
    elif os.path.isfile(os.path.join(folder, LEGACY_WEIGHTS_FILE)):
        weights = os.path.join(folder, LEGACY_WEIGHTS_FILE)
        dsd = state_dicts.read_state_dict(weights)
    else:
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (or {LEGACY_WEIGHTS_FILE}).")
    hidden = dsd["pos_embed.proj.weight"].shape[0] if "pos_embed.proj.weight" in dsd else 0
    fc1 = dsd.get("transformer_blocks.0.ff.net.0.proj.weight")
    ratio = fc1.shape[0] / hidden if fc1 is not None and hidden else 4.0
    kwargs = model_kwargs_from_config(config, diffusers_forward=diffusers_forward, mlp_ratio=ratio)
    return state_dict_from_diffusers(dsd, kwargs["input_size"], source=weights), kwargs


def load_diffusers_dit(
    path_or_hub_id: str, *, diffusers_forward: bool = False, revision: Optional[str] = None
) -> tuple[models.DiT, dict]:
    """(DiT, Flax params) from a diffusers DiT / pipeline folder or Hub id."""
    sd, kwargs = read_diffusers_dit(
        path_or_hub_id, diffusers_forward=diffusers_forward, revision=revision
    )
    model = models.DiT(**kwargs)
    return model, param_mapping.dit_params_from_state_dict(
        sd, model, source=os.fspath(path_or_hub_id)
    )


def _new_folder(folder: str) -> str:
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise CheckpointError(f"{folder}: already exists; choose a new output path.")
    os.makedirs(folder, exist_ok=True)
    return folder


def _write_json(path: str, obj: Mapping):
    files.write_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_diffusers_dit(folder: str, params: Mapping, model: models.DiT) -> str:
    """Writes `params` (Flax, of `model`) as a DiTTransformer2DModel folder: config.json +
    diffusion_pytorch_model.safetensors (float32, metadata format=pt). Returns the folder."""
    config = diffusers_config(model)
    sd = param_mapping.state_dict_from_dit_params(params, model.patch_size)
    tensors = state_dict_to_diffusers(sd)
    folder = _new_folder(folder)
    files.write_atomically(
        os.path.join(folder, WEIGHTS_FILE),
        safetensors.numpy.save(tensors, metadata={"format": "pt"}),
    )
    _write_json(os.path.join(folder, CONFIG_FILE), config)
    return folder


def write_diffusers_pipeline(
    folder: str,
    params: Mapping,
    model: models.DiT,
    vae: str,
    *,
    scheduler: str = "ddim",
    id2label: Optional[Mapping[int, str]] = None,
) -> str:
    """A DiTPipeline folder: model_index.json, transformer/ (as `write_diffusers_dit`), vae/
    copied from the diffusers VAE folder `vae` (or a pipeline's vae/), and
    scheduler/scheduler_config.json (`scheduler`: "ddim" as diffusers' DiT conversion ships,
    or "dpm" for DPM-Solver++ with linspace spacing). `id2label`: optional class names."""
    if scheduler not in SCHEDULER_CONFIGS:
        raise ValueError(
            f"scheduler must be one of {sorted(SCHEDULER_CONFIGS)}, got {scheduler!r}."
        )
    vae = os.fspath(vae)
    if os.path.isfile(os.path.join(vae, "vae", CONFIG_FILE)):
        vae = os.path.join(vae, "vae")
    if not os.path.isfile(os.path.join(vae, CONFIG_FILE)):
        raise CheckpointError(f"{vae}: not a diffusers VAE folder (no {CONFIG_FILE}).")
    folder = _new_folder(folder)
    write_diffusers_dit(os.path.join(folder, "transformer"), params, model)
    shutil.copytree(vae, os.path.join(folder, "vae"))
    sched = dict(SCHEDULER_CONFIGS[scheduler], _diffusers_version=DIFFUSERS_VERSION)
    os.makedirs(os.path.join(folder, "scheduler"))
    # json writes -inf as -Infinity, which is what diffusers' own save_config writes
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), sched)
    index = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", sched["_class_name"]],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if id2label is not None:
        index["id2label"] = {str(k): v for k, v in id2label.items()}
    _write_json(os.path.join(folder, PIPELINE_FILE), index)
    return folder
