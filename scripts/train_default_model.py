#!/usr/bin/python3
"""Trains the package's embedded default model: a small byte-level (vocabulary 256) Mamba-2 (SSD)
language model, on the plain text of the Python 3.11 documentation as Debian packages it
(python3.11-doc, PSF licence), and writes it as a Hugging Face Mamba2ForCausalLM folder
(config.json + model.safetensors) under models/default/.

    apt-get install -y python3.11-doc
    /usr/bin/python3 scripts/train_default_model.py            # ~13 minutes on 2 CPU cores

Needs only PyTorch (>= 1.13) and numpy. The model is written here from the equations in the
project's DESIGN.md (no mamba_ssm / transformers import). Options: --minutes, --out, --layers, …
(see --help). The run is deterministic up to thread scheduling: seed 0, fixed data order.
"""
import argparse
import hashlib
import html
import json
import math
import os
import re
import struct
import sys
import time
from html.parser import HTMLParser

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DOC_ROOT = "/usr/share/doc/python3.11/html"
# Debian's PyTorch calls whatever libblas.so.3 the system's alternatives select; the reference BLAS is
# ~10x slower than OpenBLAS here. If Debian's libopenblas0-openmp is installed, use it for this process
# only (the system's choice is left alone).
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-openmp"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# Data: the main text of every page of the HTML documentation (navigation, sidebars, index pages and
# the very long changelog left out), tags stripped, code blocks kept verbatim.
# --------------------------------------------------------------------------------------------------

BLOCK_TAGS = {"p", "div", "section", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl",
              "dt", "dd", "table", "tr", "blockquote", "br", "hr", "figure", "figcaption", "caption"}
SKIP_TAGS = {"script", "style"}


class MainText(HTMLParser):
    """Collects the text inside <div class="body" role="main">."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # div depth inside the main body (0: outside)
        self.skip = 0           # inside <script>/<style> or a header link
        self.pre = 0
        self.parts = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in SKIP_TAGS or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("* ")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag in SKIP_TAGS or (tag == "a" and self.skip):
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth == 0 or self.skip:
            return
        if self.pre:
            self.parts.append("\x00PRE" + data + "\x00")
        else:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self):
        raw = "".join(self.parts)
        out = []
        for piece in re.split(r"(\x00PRE.*?\x00)", raw, flags=re.S):
            if piece.startswith("\x00PRE"):
                out.append(piece[4:-1])
            else:
                # collapse runs of blank lines and the spaces around line breaks
                piece = re.sub(r" *\n *", "\n", piece)
                out.append(piece)
        t = "".join(out)
        t = t.replace("\u00b6", "")
        # typographic punctuation to ASCII, so that a small byte model rarely emits half a character
        for a, b in (("\u201c", '"'), ("\u201d", '"'), ("\u2018", "'"), ("\u2019", "'"), ("\u2014", "--"),
                     ("\u2013", "-"), ("\u2026", "..."), ("\u00a0", " "), ("\u2192", "->")):
            t = t.replace(a, b)
        t = re.sub(r"\n{3,}", "\n\n", t)
        return t.strip() + "\n"


def doc_pages(root):
    pages = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("_"))
        for fn in sorted(filenames):
            if not fn.endswith(".html"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, fn), root)
            if (fn.startswith("genindex") or fn in ("search.html", "py-modindex.html", "contents.html")
                    or rel == "whatsnew/changelog.html"):
                continue
            pages.append(rel)
    return sorted(pages)


def build_corpus(root, cache):
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    docs = []
    for rel in doc_pages(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            p = MainText()
            p.feed(f.read())
        t = p.text()
        if len(t) > 200:
            docs.append([rel, t])
    with open(cache, "w") as f:
        json.dump(docs, f)
    return docs


def split_corpus(docs, val_frac=0.02):
    """Whole pages go to the held-out split, chosen by a hash of their path, until ~val_frac of the bytes."""
    total = sum(len(t.encode()) for _, t in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    val, n = [], 0
    for rel, t in order:
        if n >= val_frac * total:
            break
        b = len(t.encode())
        if b > 4 * val_frac * total:     # no single huge page
            continue
        val.append(rel)
        n += b
    val = set(val)
    train_b = b"".join(t.encode() + b"\n\n" for rel, t in docs if rel not in val)
    val_b = b"".join(t.encode() + b"\n\n" for rel, t in docs if rel in val)
    return train_b, val_b, sorted(val)


# --------------------------------------------------------------------------------------------------
# Model: Mamba-2 (SSD), as in DESIGN.md.
# --------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)) * self.weight


def segsum(x):
    """x [..., T] -> [..., T, T] with out[i, j] = sum(x[j+1 .. i]) for j <= i, -inf above the diagonal."""
    T = x.size(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, T)                        # [..., T(i), T(j)] = x[i]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0.0)
    s = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return s.masked_fill(~keep, -math.inf)


def ssd_chunked(x, dtA, B, C, Q):
    """The minimal chunked SSD, G = 1.
    x [b, L, H, P] (already times dt), dtA [b, L, H], B, C [b, L, N]; L a multiple of Q. -> y [b, L, H, P]."""
    b, L, H, P = x.shape
    N = B.size(-1)
    c = L // Q
    x = x.reshape(b, c, Q, H, P).permute(0, 1, 3, 2, 4)              # [b, c, H, Q, P]
    A = dtA.reshape(b, c, Q, H).permute(0, 3, 1, 2)                  # [b, H, c, Q]
    B = B.reshape(b, c, Q, N)
    C = C.reshape(b, c, Q, N)
    A_cs = torch.cumsum(A, dim=-1)                                   # [b, H, c, Q]
    # 1. intra-chunk: (C·Bᵀ ⊙ decay) · x
    Lmat = torch.exp(segsum(A)).permute(0, 2, 1, 3, 4)               # [b, c, H, Q, Q]
    CB = torch.matmul(C, B.transpose(-1, -2))                        # [b, c, Q, Q]
    y_diag = torch.matmul(CB.unsqueeze(2) * Lmat, x)                 # [b, c, H, Q, P]
    # 2. the state each chunk ends with (from its own inputs)
    decay_states = torch.exp(A_cs[..., -1:] - A_cs).permute(0, 2, 1, 3)   # [b, c, H, Q]
    states = torch.matmul((x * decay_states.unsqueeze(-1)).transpose(-1, -2), B.unsqueeze(2))  # [b, c, H, P, N]
    # 3. inter-chunk recurrence
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)  # [b, c+1, H, P, N]
    decay_chunk = torch.exp(segsum(F.pad(A_cs[..., -1], (1, 0))))   # [b, H, c+1, c+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states = new_states[:, :-1]                                      # state entering each chunk
    # 4. state -> output
    state_decay_out = torch.exp(A_cs).permute(0, 2, 1, 3)            # [b, c, H, Q]
    y_off = torch.matmul(C.unsqueeze(2), states.transpose(-1, -2)) * state_decay_out.unsqueeze(-1)  # [b,c,H,Q,P]
    y = y_diag + y_off
    return y.permute(0, 1, 3, 2, 4).reshape(b, L, H, P)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.H, self.P, self.N = cfg["d_model"], cfg["n_heads"], cfg["head_dim"], cfg["d_state"]
        self.d_inner = self.H * self.P
        self.K = cfg["d_conv"]
        self.Q = cfg["chunk"]
        self.eps = cfg["eps"]
        conv_dim = self.d_inner + 2 * self.N
        self.in_proj = nn.Linear(d, 2 * self.d_inner + 2 * self.N + self.H, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.K, groups=conv_dim, padding=self.K - 1, bias=True)
        dt = torch.exp(torch.rand(self.H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))      # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(self.H).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.H))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    def forward(self, h):
        b, L, _ = h.shape
        zxbcdt = self.in_proj(h)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.d_inner + 2 * self.N, self.H], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = torch.split(xBC, [self.d_inner, self.N, self.N], dim=-1)
        dt = F.softplus(dt + self.dt_bias)                            # [b, L, H]
        A = -torch.exp(self.A_log)
        x = x.reshape(b, L, self.H, self.P)
        pad = (-L) % self.Q
        xs, dts, Bs, Cs = x * dt.unsqueeze(-1), dt * A, B, C
        if pad:
            xs, dts = F.pad(xs, (0, 0, 0, 0, 0, pad)), F.pad(dts, (0, 0, 0, pad))
            Bs, Cs = F.pad(Bs, (0, 0, 0, pad)), F.pad(Cs, (0, 0, 0, pad))
        y = ssd_chunked(xs, dts, Bs, Cs, self.Q)[:, :L]
        y = y + self.D.view(1, 1, self.H, 1) * x
        y = y.reshape(b, L, self.d_inner) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight   # G = 1
        return self.out_proj(y)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg["d_model"], cfg["eps"])
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h):
        return h + self.mixer(self.norm(h))


class Mamba2LM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(256, cfg["d_model"])
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.norm_f = RMSNorm(cfg["d_model"], cfg["eps"])
        nn.init.normal_(self.embeddings.weight, std=0.02)
        for blk in self.layers:
            # as the reference's _init_weights (rescale_prenorm_residual, n_residuals_per_layer = 1)
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                blk.mixer.out_proj.weight /= math.sqrt(cfg["n_layer"])

    def forward(self, ids):
        h = self.embeddings(ids)
        for blk in self.layers:
            h = blk(h)
        return F.linear(self.norm_f(h), self.embeddings.weight)


# --------------------------------------------------------------------------------------------------
# Export: Hugging Face Mamba2ForCausalLM folder, safetensors written by hand.
# --------------------------------------------------------------------------------------------------

def bf16_round(t):
    """float32 -> nearest bfloat16 (ties to even), returned as float32 values and as the raw uint16s."""
    a = t.detach().float().contiguous().numpy().astype(np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    back = (r.astype(np.uint32) << 16).view(np.float32)
    return torch.from_numpy(back.copy()), r


def hf_tensors(model):
    cfg = model.cfg
    out = {"backbone.embeddings.weight": model.embeddings.weight, "backbone.norm_f.weight": model.norm_f.weight}
    for i, blk in enumerate(model.layers):
        p = f"backbone.layers.{i}."
        m = blk.mixer
        out[p + "norm.weight"] = blk.norm.weight
        out[p + "mixer.in_proj.weight"] = m.in_proj.weight
        out[p + "mixer.conv1d.weight"] = m.conv1d.weight
        out[p + "mixer.conv1d.bias"] = m.conv1d.bias
        out[p + "mixer.dt_bias"] = m.dt_bias
        out[p + "mixer.A_log"] = m.A_log
        out[p + "mixer.D"] = m.D
        out[p + "mixer.norm.weight"] = m.norm_weight
        out[p + "mixer.out_proj.weight"] = m.out_proj.weight
    return out


def is_bf16_tensor(name, dtype_matrices):
    return dtype_matrices == "BF16" and (name.endswith("in_proj.weight") or name.endswith("out_proj.weight")
                                         or name == "backbone.embeddings.weight")


def round_model_to_storage(model, dtype_matrices):
    """Rounds the model's matrices in place to what the file will hold."""
    with torch.no_grad():
        for name, t in hf_tensors(model).items():
            if is_bf16_tensor(name, dtype_matrices):
                t.copy_(bf16_round(t)[0].view_as(t))


def write_safetensors(path, tensors, dtype_matrices, metadata):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous()
        if is_bf16_tensor(name, dtype_matrices):
            data, dt = bf16_round(t)[1].astype("<u2").tobytes(), "BF16"
        else:
            data, dt = t.numpy().astype("<f4").tobytes(), "F32"
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    header["__metadata__"] = metadata
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((-len(hj)) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def hf_config(cfg):
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "hidden_size": cfg["d_model"],
        "num_hidden_layers": cfg["n_layer"],
        "num_heads": cfg["n_heads"],
        "head_dim": cfg["head_dim"],
        "n_groups": 1,
        "state_size": cfg["d_state"],
        "expand": cfg["n_heads"] * cfg["head_dim"] // cfg["d_model"],
        "conv_kernel": cfg["d_conv"],
        "chunk_size": cfg["chunk"],
        "vocab_size": 256,
        "use_bias": False,
        "use_conv_bias": True,
        "rms_norm": True,
        "norm_before_gate": False,
        "layer_norm_epsilon": cfg["eps"],
        "time_step_limit": [0.0, float("inf")],
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 0.0001,
        "tie_word_embeddings": True,
        "residual_in_fp32": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------

def main():
    if os.path.isdir(OPENBLAS) and OPENBLAS not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [OPENBLAS, os.environ.get("LD_LIBRARY_PATH")])))
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "default"))
    ap.add_argument("--cache", default="/tmp/mamba_default_corpus.json")
    ap.add_argument("--minutes", type=float, default=13.0, help="training wall time (evaluations included)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--est-steps", type=int, default=0, help="steps for the cosine (0: measure the speed first)")
    ap.add_argument("--eval-every", type=int, default=60)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows of the periodic evaluations")
    ap.add_argument("--dtype", choices=["BF16", "F32"], default="BF16", help="storage of the matrices")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    t_start = time.time()

    docs = build_corpus(DOC_ROOT, args.cache)
    train_b, val_b, val_pages = split_corpus(docs)
    train = torch.from_numpy(np.frombuffer(train_b, dtype=np.uint8).astype(np.int64))
    val = torch.from_numpy(np.frombuffer(val_b, dtype=np.uint8).astype(np.int64))
    print(f"corpus: {len(docs)} pages, train {len(train_b)} bytes, held-out {len(val_b)} bytes "
          f"({len(val_pages)} pages), prepared in {time.time() - t_start:.1f}s", flush=True)

    cfg = {"d_model": args.d_model, "n_layer": args.layers, "head_dim": args.head_dim,
           "n_heads": args.expand * args.d_model // args.head_dim, "d_state": args.d_state,
           "d_conv": 4, "chunk": args.chunk, "eps": 1e-5}
    model = Mamba2LM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg}, {n_params} parameters", flush=True)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() == 2 else no_decay).append(p)     # matrices: in/out_proj and the (tied) embedding
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    T, Bsz = args.seq, args.batch
    gen = torch.Generator().manual_seed(1234)

    def batch():
        ix = torch.randint(0, len(train) - T - 1, (Bsz,), generator=gen)
        xb = torch.stack([train[i:i + T + 1] for i in ix])
        return xb[:, :-1], xb[:, 1:]

    # fixed held-out windows of 512 bytes, non-overlapping, spread over the split; the final number uses
    # all of them (~128 KiB), the periodic checks the first --eval-windows of a shuffled order
    T_eval = 512
    n_win = min(256, (len(val) - 1) // T_eval)
    starts = torch.linspace(0, len(val) - T_eval - 2, n_win).long()
    starts = starts[torch.randperm(n_win, generator=torch.Generator().manual_seed(7))]
    val_x = torch.stack([val[s:s + T_eval] for s in starts])
    val_y = torch.stack([val[s + 1:s + T_eval + 1] for s in starts])

    def evaluate(m, windows=None):
        m.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            k = len(val_x) if windows is None else windows
            for i in range(0, k, 32):
                lo = m(val_x[i:min(k, i + 32)])
                tot += F.cross_entropy(lo.reshape(-1, 256), val_y[i:min(k, i + 32)].reshape(-1), reduction="sum").item()
                n += val_y[i:min(k, i + 32)].numel()
        m.train()
        return tot / n / math.log(2)

    def train_step(step, total_steps):
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            pr = min(1.0, (step - args.warmup) / max(1, total_steps - args.warmup))
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item(), lr

    budget = args.minutes * 60
    t0 = time.time()
    # measure the speed on the first steps (they train too) to size the cosine schedule
    total_steps = args.est_steps or 10 ** 9
    losses = []
    step = 0
    n_probe = 8
    while step < n_probe:
        l, lr = train_step(step, args.warmup + 1000)
        losses.append(l)
        step += 1
    per_step = (time.time() - t0) / n_probe
    t_eval0 = time.time()
    _ = evaluate(model, 32)
    eval_cost = (time.time() - t_eval0) * args.eval_windows / 32
    print(f"{per_step:.2f}s/step ({Bsz * T / per_step:.0f} bytes/s), full eval {eval_cost:.1f}s", flush=True)
    if args.bench:
        return
    if not args.est_steps:
        left = budget - (time.time() - t0)
        evals = left / (args.eval_every * per_step + eval_cost)
        total_steps = n_probe + int((left - evals * eval_cost) / per_step)
    print(f"planning {total_steps} steps", flush=True)

    best, best_state, best_step = float("inf"), None, -1
    log = []
    while True:
        elapsed = time.time() - t0
        if step >= total_steps or elapsed > budget:
            break
        l, lr = train_step(step, total_steps)
        losses.append(l)
        step += 1
        if step % args.eval_every == 0 or step == total_steps:
            bpb = evaluate(model, args.eval_windows)
            tr = sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:]) / math.log(2)
            log.append((step, time.time() - t0, tr, bpb))
            print(f"step {step:5d}  {time.time() - t0:6.0f}s  lr {lr:.2e}  train {tr:.3f} bpb  held-out {bpb:.3f} bpb",
                  flush=True)
            if bpb < best:
                best, best_step = bpb, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_time = time.time() - t0
    if best_state is None or (log and log[-1][0] != step):     # stopped by the time limit between checks
        bpb = evaluate(model, args.eval_windows)
        print(f"final step {step}: held-out {bpb:.3f} bpb", flush=True)
        if bpb < best:
            best, best_step, best_state = bpb, step, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)

    # what the file holds: the matrices rounded to bf16
    bpb_f32 = evaluate(model)
    round_model_to_storage(model, args.dtype)
    bpb_stored = evaluate(model)
    print(f"best step {best_step}: held-out {bpb_f32:.4f} bpb (fp32), {bpb_stored:.4f} bpb as stored ({args.dtype})",
          flush=True)

    os.makedirs(args.out, exist_ok=True)
    meta = {"format": "pt", "source": "scripts/train_default_model.py",
            "training_data": "Python 3.11 documentation (Debian python3.11-doc), PSF License"}
    write_safetensors(os.path.join(args.out, "model.safetensors"), hf_tensors(model), args.dtype, meta)
    with open(os.path.join(args.out, "config.json.tmp"), "w") as f:
        # json writes inf as Infinity, as transformers does
        json.dump(hf_config(cfg), f, indent=2)
        f.write("\n")
    os.replace(os.path.join(args.out, "config.json.tmp"), os.path.join(args.out, "config.json"))
    report = {"params": n_params, "config": cfg, "train_bytes": len(train_b), "val_bytes": len(val_b),
              "val_pages": val_pages, "steps": step, "best_step": best_step, "batch": Bsz, "seq": T,
              "bytes_seen": step * Bsz * T, "train_seconds": round(train_time, 1),
              "heldout_bpb_f32": bpb_f32, "heldout_bpb_stored": bpb_stored, "log": log,
              "torch": torch.__version__}
    with open("/tmp/mamba_default_report.json", "w") as f:
        json.dump(report, f, indent=1)
    torch.save({"cfg": cfg, "state": model.state_dict()}, "/tmp/mamba_default_model.pt")
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "val_pages")}), flush=True)


if __name__ == "__main__":
    main()
