# Writes real torch.save files for the checkpoint reader's tests.
import argparse, collections, numpy as np, torch
out = '/work/main/tests/data/'
sd = {k: torch.from_numpy(v) for k, v in np.load('/tmp/tiny_sd.npz').items()}
ema = collections.OrderedDict((k, v * 0.5) for k, v in sd.items())
model = collections.OrderedDict(sd)
opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-4)
opt.state_dict()
torch.save({"model": model, "ema": ema, "opt": opt.state_dict(),
            "args": argparse.Namespace(model="tiny", lr=1e-4, global_batch_size=256)}, out + "dit_tiny_train.pt")
torch.save(ema, out + "dit_tiny_ema_state_dict.pth")
g = torch.Generator().manual_seed(0)
base = torch.randn(4, 6, generator=g)
formats = collections.OrderedDict(
    f32=torch.randn(2, 3, generator=g), f64=torch.randn(3, generator=g).double(),
    f16=torch.randn(5, generator=g).half(), bf16=torch.randn(2, 2, generator=g).bfloat16(),
    i64=torch.arange(12).view(3, 4), transposed=base.t(), sliced=base[1:3, 2:5], scalar=torch.tensor(3.5),
    boolean=torch.tensor([True, False, True]), param=torch.nn.Parameter(torch.ones(2, 2) * 2), empty=torch.zeros(0, 3))
torch.save(formats, out + "torch_formats.pt")
np.savez(out + "torch_formats_expected.npz", **{k: (v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()) for k, v in formats.items()})
