#!/usr/bin/env python3
# The PyTorch side of bench/train.ts: the same byte-level Mamba language model as a plain nn.Module,
# written from the equations of DESIGN.md (no CUDA kernels, no mamba_ssm package), and the time of one
# training step (forward, backward, AdamW) in fp32 and in bf16 autocast on the CPU.
#
# The selective scan is the reference's sequential loop over time (mamba_ssm's selective_scan_ref),
# which is what PyTorch offers on a CPU: one small batch of tensor ops per token and layer.
#
# Glossary: b batch, l length (tokens), d d_model, di d_inner, n state size (N), k conv width (K),
# r rank of Δ (Mamba-1), h heads, p head size, g B/C groups (Mamba-2).
#
#   python3 bench/train_torch.py --arch mamba1 --d-model 256 --layers 4 --state 16 --length 1024 \
#       --batch 4 --steps 2 --warmup-steps 1 --threads 2 [--dtypes fp32,bf16]
# Prints one JSON line (the last line of stdout).
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * weight


class Mamba1Mixer(nn.Module):
    def __init__(self, d, di, n, k, r):
        super().__init__()
        self.di, self.n, self.r = di, n, r
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, k, groups=di, padding=k - 1, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        # S4D-real initialisation, as the reference: A = -(1..N) per channel.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def forward(self, hn):  # hn [b, l, d]
        b, l, _ = hn.shape
        x, z = self.in_proj(hn).chunk(2, dim=-1)  # [b, l, di] each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :l].transpose(1, 2))  # causal depthwise conv
        dt, B, C = torch.split(self.x_proj(x), [self.r, self.n, self.n], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # [b, l, di]
        A = -torch.exp(self.A_log.float())  # [di, n]
        # s_t = exp(Δ_t·A) ⊙ s_{t-1} + (Δ_t·x_t) ⊗ B_t ;  y_t = s_t·C_t   (selective_scan_ref)
        dA = torch.exp(dt.unsqueeze(-1) * A)  # [b, l, di, n]
        dBx = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # [b, l, di, n]
        s = hn.new_zeros(b, self.di, self.n, dtype=dA.dtype)
        ys = []
        # unbind, not dA[:, t]: the backward of an index fills a whole [b, l, ...] gradient per step.
        for dA_t, dBx_t, C_t in zip(dA.unbind(1), dBx.unbind(1), C.to(s.dtype).unbind(1)):
            s = dA_t * s + dBx_t
            ys.append(torch.einsum("bdn,bn->bd", s, C_t))
        y = torch.stack(ys, dim=1) + x * self.D
        return self.out_proj(y * F.silu(z))


class Mamba2Mixer(nn.Module):
    def __init__(self, d, di, n, k, p, g, eps):
        super().__init__()
        self.di, self.n, self.p, self.g, self.eps = di, n, p, g, eps
        self.h = di // p
        self.in_proj = nn.Linear(d, 2 * di + 2 * g * n + self.h, bias=False)
        channels = di + 2 * g * n
        self.conv1d = nn.Conv1d(channels, channels, k, groups=channels, padding=k - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.rand(self.h) * 0.1)
        self.A_log = nn.Parameter(torch.log(1 + 15 * torch.rand(self.h)))
        self.D = nn.Parameter(torch.ones(self.h))
        self.ssm_norm = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def forward(self, hn):  # hn [b, l, d]
        b, l, _ = hn.shape
        h, p, n, g = self.h, self.p, self.n, self.g
        z, xBC, dt = torch.split(self.in_proj(hn), [self.di, self.di + 2 * g * n, h], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :l].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.di, g * n, g * n], dim=-1)
        x = x.reshape(b, l, h, p)
        # Each head reads its group's B and C.
        B = B.reshape(b, l, g, n).repeat_interleave(h // g, dim=2)  # [b, l, h, n]
        C = C.reshape(b, l, g, n).repeat_interleave(h // g, dim=2)
        dt = F.softplus(dt + self.dt_bias)  # [b, l, h]
        A = -torch.exp(self.A_log.float())  # [h]
        dA = torch.exp(dt * A)  # [b, l, h]
        # s_t[h] = exp(Δ·A[h])·s_{t-1}[h] + Δ·x_t[h] ⊗ B_t ;  y_t[h] = s_t[h]·C_t
        dBx = (dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(3)  # [b, l, h, p, n]
        s = hn.new_zeros(b, h, p, n, dtype=dBx.dtype)
        ys = []
        for dA_t, dBx_t, C_t in zip(dA.to(s.dtype).unbind(1), dBx.unbind(1), C.to(s.dtype).unbind(1)):
            s = dA_t[:, :, None, None] * s + dBx_t
            ys.append(torch.einsum("bhpn,bhn->bhp", s, C_t))
        y = torch.stack(ys, dim=1) + x * self.D[:, None]
        y = (y.reshape(b, l, self.di) * F.silu(z)).reshape(b, l, g, self.di // g)
        y = rmsnorm(y, 1.0, self.eps).reshape(b, l, self.di) * self.ssm_norm
        return self.out_proj(y)


class MambaLM(nn.Module):
    def __init__(self, args):
        super().__init__()
        d, di, self.eps = args.d_model, args.expand * args.d_model, 1e-5
        self.embedding = nn.Embedding(256, d)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if args.arch == "mamba1":
            mixer = lambda: Mamba1Mixer(d, di, args.state, 4, math.ceil(d / 16))
        else:
            mixer = lambda: Mamba2Mixer(d, di, args.state, 4, args.head_dim, 1, self.eps)
        self.mixers = nn.ModuleList([mixer() for _ in range(args.layers)])
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(d)) for _ in range(args.layers)])
        self.norm_f = nn.Parameter(torch.ones(d))

    def forward(self, ids, targets):
        h = self.embedding(ids)
        # Pre-norm residual blocks; the residual stream stays fp32.
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(rmsnorm(h, norm, self.eps)).float()
        logits = F.linear(rmsnorm(h, self.norm_f, self.eps), self.embedding.weight)  # tied head
        return F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))


def time_steps(model, opt, ids, targets, dtype, steps, warmup):
    def step():
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    first_loss = None
    for _ in range(warmup):
        _, loss = step()
        first_loss = first_loss if first_loss is not None else loss
    samples = []
    for _ in range(steps):
        seconds, loss = step()
        first_loss = first_loss if first_loss is not None else loss
        samples.append(seconds)
    return statistics.median(samples), samples, first_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="mamba1", choices=["mamba1", "mamba2"])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MambaLM(args)
    parameters = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (args.batch, args.length + 1), generator=g)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    results = []
    for dtype in args.dtypes.split(","):
        seconds, samples, loss = time_steps(model, opt, ids, targets, dtype, args.steps, args.warmup_steps)
        tokens = args.batch * args.length
        results.append(
            {
                "dtype": dtype,
                "stepSeconds": round(seconds, 4),
                "samples": [round(s, 4) for s in samples],
                "tokensPerSecond": round(tokens / seconds, 2),
                "firstLoss": round(loss, 4),
            }
        )
        print(f"torch {dtype}: {seconds:.3f} s/step, {tokens / seconds:.0f} tok/s", file=sys.stderr)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "arch": args.arch,
                "parameters": parameters,
                "batch": args.batch,
                "length": args.length,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
