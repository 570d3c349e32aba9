"""Writes the real `torch.save` files under tests/data (needs PyTorch; not run by the tests).

dit_tiny_train.pt            {"model", "ema", "opt", "args"} as the official train.py writes, for a
                             DiT with input 4, patch 2, hidden 32, depth 1, 2 heads, 10 classes
                             (ema = 0.5 * model, so the two entries are told apart)
dit_tiny_ema_state_dict.pth  the ema entry alone, as the released checkpoints are plain state dicts
torch_formats.pt             assorted dtypes and strided views; torch_formats_expected.npz holds the
                             same values written by numpy (bf16 widened to float32)
"""

import argparse
import collections
import os

import numpy as np
import torch

OUT = os.path.dirname(os.path.abspath(__file__))
D, C, P, CLASSES, TOKENS = 32, 4, 2, 10, 4
SHAPES = {
    "pos_embed": (1, TOKENS, D),
    "x_embedder.proj.weight": (D, C, P, P),
    "x_embedder.proj.bias": (D,),
    "t_embedder.mlp.0.weight": (D, 256),
    "t_embedder.mlp.0.bias": (D,),
    "t_embedder.mlp.2.weight": (D, D),
    "t_embedder.mlp.2.bias": (D,),
    "y_embedder.embedding_table.weight": (CLASSES + 1, D),
    "blocks.0.attn.qkv.weight": (3 * D, D),
    "blocks.0.attn.qkv.bias": (3 * D,),
    "blocks.0.attn.proj.weight": (D, D),
    "blocks.0.attn.proj.bias": (D,),
    "blocks.0.mlp.fc1.weight": (4 * D, D),
    "blocks.0.mlp.fc1.bias": (4 * D,),
    "blocks.0.mlp.fc2.weight": (D, 4 * D),
    "blocks.0.mlp.fc2.bias": (D,),
    "blocks.0.adaLN_modulation.1.weight": (6 * D, D),
    "blocks.0.adaLN_modulation.1.bias": (6 * D,),
    "final_layer.linear.weight": (P * P * 2 * C, D),
    "final_layer.linear.bias": (P * P * 2 * C,),
    "final_layer.adaLN_modulation.1.weight": (2 * D, D),
    "final_layer.adaLN_modulation.1.bias": (2 * D,),
}


def main():
    g = torch.Generator().manual_seed(0)
    model = collections.OrderedDict(
        (k, 0.1 * torch.randn(s, generator=g)) for k, s in SHAPES.items()
    )
    ema = collections.OrderedDict((k, v * 0.5) for k, v in model.items())
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, generator=g))], lr=1e-4)
    torch.save(
        {
            "model": model,
            "ema": ema,
            "opt": opt.state_dict(),
            "args": argparse.Namespace(model="tiny", lr=1e-4, global_batch_size=256),
        },
        os.path.join(OUT, "dit_tiny_train.pt"),
    )
    torch.save(ema, os.path.join(OUT, "dit_tiny_ema_state_dict.pth"))

    base = torch.randn(4, 6, generator=g)
    formats = collections.OrderedDict(
        f32=torch.randn(2, 3, generator=g),
        f64=torch.randn(3, generator=g).double(),
        f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(2, 2, generator=g).bfloat16(),
        i64=torch.arange(12).view(3, 4),
        transposed=base.t(),
        sliced=base[1:3, 2:5],
        scalar=torch.tensor(3.5),
        boolean=torch.tensor([True, False, True]),
        param=torch.nn.Parameter(torch.ones(2, 2) * 2),
        empty=torch.zeros(0, 3),
    )
    torch.save(formats, os.path.join(OUT, "torch_formats.pt"))
    np.savez(
        os.path.join(OUT, "torch_formats_expected.npz"),
        **{
            k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
            for k, v in formats.items()
        },
    )


if __name__ == "__main__":
    main()
