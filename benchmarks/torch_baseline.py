"""A PyTorch DiT train step: the yardstick for dit_jax's CPU speed (not part of the package).

Written from the paper (Peebles & Xie 2023) and following the official code's choices, so that
its train step costs what the official one costs:

* patch embedding as a strided Conv2d on NCHW latents, fixed 2-D sin-cos position table stored
  as a non-trainable parameter (counted, as in the official parameter count);
* timestep embedder (256 frequencies, cos then sin -> Linear -> SiLU -> Linear), label table
  with a null row and 10% label dropout in training;
* adaLN-Zero blocks: LayerNorm eps 1e-6 without affine, SiLU -> Linear(6D) modulation,
  attention with one qkv Linear (as timm's `Attention`, which the official model imports),
  MLP Linear -> GELU(tanh) -> Linear at 4x width;
* the hybrid loss of improved DDPM with learned sigma (linear betas, 1000 steps): mse on epsilon
  plus the variational bound in bits/dim through a stop-gradient on the mean;
* AdamW(lr 1e-4, weight decay 0) and an EMA of the weights (decay 0.9999) after each step.

Attention: timm >= 0.9's `Attention` (the official model's) calls
`F.scaled_dot_product_attention` when available, which is the default here
(`attention="sdpa"`); `attention="explicit"` is the older softmax(q k^T) v in three ops.

  python benchmarks/torch_baseline.py --model=S/2 --batch=8        # images/s of the step
  python benchmarks/torch_baseline.py --count                      # parameter counts

Install PyTorch for this (CPU wheel): pip install torch --index-url https://download.pytorch.org/whl/cpu
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def parse_name(name: str) -> dict:
    size, patch = name.upper().replace("DIT-", "").split("/")
    depth, hidden, heads = SIZES[size]
    return dict(depth=depth, hidden=hidden, heads=heads, patch=int(patch))


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """[grid*grid, dim]: first half of the channels encodes the column, second half the row."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class SelfAttention(tnn.Module):
    def __init__(self, dim: int, heads: int, implementation: str):
        super().__init__()
        self.heads, self.implementation = heads, implementation
        self.qkv = tnn.Linear(dim, 3 * dim)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [n, heads, t, e]
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)
            out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(tnn.Module):
    def __init__(self, dim: int, heads: int, attention: str):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, attention)
        self.norm2 = tnn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = tnn.Linear(dim, 4 * dim), tnn.Linear(4 * dim, dim)
        self.modulation = tnn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), s2, sc2)), approximate="tanh"))
        return x + g2.unsqueeze(1) * h


class TorchDiT(tnn.Module):
    def __init__(
        self,
        depth,
        hidden,
        heads,
        patch,
        input_size=32,
        in_channels=4,
        num_classes=1000,
        class_dropout_prob=0.1,
        attention="sdpa",
    ):
        super().__init__()
        self.patch, self.in_channels, self.out_channels = patch, in_channels, 2 * in_channels
        self.num_classes, self.dropout = num_classes, class_dropout_prob
        self.grid = input_size // patch
        self.x_embedder = tnn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        table = torch.from_numpy(sincos_table(hidden, self.grid)).float().unsqueeze(0)
        self.pos_embed = tnn.Parameter(table, requires_grad=False)
        self.t_mlp = tnn.Sequential(tnn.Linear(256, hidden), tnn.SiLU(), tnn.Linear(hidden, hidden))
        self.y_table = tnn.Embedding(num_classes + int(class_dropout_prob > 0), hidden)
        self.blocks = tnn.ModuleList([Block(hidden, heads, attention) for _ in range(depth)])
        self.norm_final = tnn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = tnn.Linear(hidden, 2 * hidden)
        self.final_linear = tnn.Linear(hidden, patch * patch * self.out_channels)
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, tnn.Linear):
                tnn.init.xavier_uniform_(m.weight)
                tnn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        tnn.init.xavier_uniform_(w.view(w.shape[0], -1))
        tnn.init.zeros_(self.x_embedder.bias)
        tnn.init.normal_(self.y_table.weight, std=0.02)
        for layer in (self.t_mlp[0], self.t_mlp[2]):
            tnn.init.normal_(layer.weight, std=0.02)
        for m in [b.modulation for b in self.blocks] + [self.final_modulation, self.final_linear]:
            tnn.init.zeros_(m.weight)
            tnn.init.zeros_(m.bias)

    @staticmethod
    def timestep_embedding(t, dim=256, max_period=10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y):
        """x: [N, C, H, W], t: [N] int, y: [N] int -> [N, 2C, H, W]."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0]) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        c = self.t_mlp(self.timestep_embedding(t)) + self.y_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        out = self.final_linear(modulate(self.norm_final(tokens), shift, scale))
        n, g, p, co = x.shape[0], self.grid, self.patch, self.out_channels
        out = out.reshape(n, g, g, p, p, co)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(n, co, g * p, g * p)


class HybridLoss:
    """improved-DDPM loss with learned sigma: mse(eps) + vb (bits/dim), linear betas."""

    def __init__(self, steps: int = 1000):
        scale = 1000 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        post_var = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        tables = dict(
            sqrt_ac=np.sqrt(alphas_cumprod),
            sqrt_1m_ac=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_ac=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_ac=np.sqrt(1.0 / alphas_cumprod - 1),
            post_log_var=np.log(np.append(post_var[1], post_var[1:])),
            log_betas=np.log(betas),
            coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        )
        self.steps = steps
        self.t = {k: torch.from_numpy(v) for k, v in tables.items()}

    def _at(self, name, t):
        return self.t[name][t].float()[:, None, None, None]

    def __call__(self, model, x0, y):
        n = x0.shape[0]
        t = torch.randint(0, self.steps, (n,))
        noise = torch.randn_like(x0)
        xt = self._at("sqrt_ac", t) * x0 + self._at("sqrt_1m_ac", t) * noise
        out = model(xt, t, y)
        c = x0.shape[1]
        eps, var_values = out[:, :c], out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # vb with the mean frozen: only the variance output learns from it.
        frac = (var_values + 1) / 2
        min_log, max_log = self._at("post_log_var", t), self._at("log_betas", t)
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_ac", t) * xt - self._at("sqrt_recipm1_ac", t) * eps.detach()
        mean = self._at("coef1", t) * pred_x0 + self._at("coef2", t) * xt
        true_mean = self._at("coef1", t) * x0 + self._at("coef2", t) * xt
        true_log_var = self._at("post_log_var", t)
        kl = 0.5 * (
            -1.0
            + log_var
            - true_log_var
            + torch.exp(true_log_var - log_var)
            + (true_mean - mean) ** 2 * torch.exp(-log_var)
        )
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class TrainStep:
    """model + AdamW (the official call: lr 1e-4, weight decay 0) + EMA, on one fixed batch."""

    def __init__(self, name="S/2", batch=8, attention="sdpa", seed=0, ema_decay=0.9999):
        torch.manual_seed(seed)
        self.model = TorchDiT(**parse_name(name), attention=attention)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.loss = HybridLoss()
        self.decay = ema_decay
        self.x = torch.randn(batch, 4, 32, 32)
        self.y = torch.randint(0, 1000, (batch,))
        self.model.train()

    def __call__(self):
        loss = self.loss(self.model, self.x, self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, self.decay)
            torch._foreach_add_(self.ema, self.params, alpha=1 - self.decay)
        return float(loss.detach())


def count(model: tnn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--attention", choices=("sdpa", "explicit"), default="sdpa")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count", action="store_true", help="print parameter counts and exit")
    args = parser.parse_args()
    if args.count:
        for name in ("S/2", "B/4"):
            print(f"DiT-{name}: {count(TorchDiT(**parse_name(name))):,} parameters")
        return
    step = TrainStep(args.model, args.batch, args.attention)
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append(time.perf_counter() - start)
    print(
        f"DiT-{args.model} batch {args.batch}, {torch.get_num_threads()} threads: "
        f"{args.steps * args.batch / statistics.median(times):.2f} images/s"
    )


if __name__ == "__main__":
    main()
