#!/usr/bin/env python3
"""Writes test/fixtures/models/: small random Mamba-1 / Mamba-2 language models in every checkpoint
layout the loaders read (Hugging Face folder, mamba_ssm folder, GGUF F32 and Q8_0), a hand-made
byte-level BPE tokenizer.json, and for each model what a correct implementation must output
(expected.json), computed here by an independent float64 reference written with PyTorch.

Run from the repository root:  python3 scripts/make_fixtures.py
(needs torch and numpy; Debian's python3-torch is enough: /usr/bin/python3 if another python3 shadows it).
Deterministic: fixed seeds, no timestamps, so a rerun rewrites identical bytes.

Glossary (as in DESIGN.md): L sequence length, d d_model, di d_inner, N state size, K conv width,
R dt_rank, H heads, P head size (di = H·P), G B/C groups, Q SSD chunk length, V vocabulary rows.

The reference does not share code with the project: every equation is written out again from
DESIGN.md. Weights are drawn in float64, rounded to float32 (the stored values), and the reference
computes in float64 from exactly those float32 values, so the only error left in a float32
implementation is its own arithmetic.
"""
import json
import math
import os
import shutil
import struct
import sys

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as error:
    # Debian's python3-torch lives in the system interpreter; a python3 earlier on PATH (pyenv, venv)
    # may not see it, so try that one once before giving up
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") \
            and not os.environ.get("MAKE_FIXTURES_REEXEC"):
        os.environ["MAKE_FIXTURES_REEXEC"] = "1"
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    sys.exit(f"make_fixtures.py needs numpy and torch ({error}); on Debian: apt-get install python3-torch, "
             f"then run it with /usr/bin/python3 if another python3 comes first on PATH")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "test", "fixtures", "models")
NORM_EPS = 1e-5
PROMPT_LENGTHS = (1, 7, 13)
GREEDY_STEPS = 8
MAX_FILE_BYTES = 200 * 1024
BC_STD = 0.5

# ---------------------------------------------------------------------------------------------
# Model specifications. vocab: the weights' rows (HF vocab_size); vocab_unpadded: mamba_ssm's
# vocab_size and the range of the random prompt ids; R_config: time_step_rank as config.json says it;
# limit: Mamba-2's time_step_limit. Seeds were picked among a few so that every greedy continuation
# uses at least 3 distinct tokens and no greedy step is near a tie (build_model asserts both).
# ---------------------------------------------------------------------------------------------

MODELS = [
    dict(name="mamba1-tiny", arch="mamba1", seed=1001, d=24, layers=2, vocab=72, vocab_unpadded=70,
         di=48, N=5, R=3, R_config=3, K=4, bias=True, conv_bias=True, tied=False, mamba_ssm=True),
    dict(name="mamba1-tied", arch="mamba1", seed=1006, d=16, layers=3, vocab=40, vocab_unpadded=40,
         di=32, N=16, R=1, R_config="auto", K=4, bias=False, conv_bias=False, tied=True, mamba_ssm=False),
    dict(name="mamba2-tiny", arch="mamba2", seed=2001, d=32, layers=2, vocab=72, vocab_unpadded=69,
         H=4, P=16, G=2, N=8, K=4, Q=4, bias=False, conv_bias=True, tied=False,
         limit=(0.0, math.inf), mamba_ssm=True),
    dict(name="mamba2-groups1", arch="mamba2", seed=2004, d=24, layers=2, vocab=48, vocab_unpadded=48,
         H=3, P=16, G=1, N=12, K=4, Q=5, bias=True, conv_bias=True, tied=True,
         limit=(0.001, 0.05), mamba_ssm=False),
    # vocab filled in from the tokenizer (273 → padded to 280)
    dict(name="mamba1-bytebpe", arch="mamba1", seed=3004, d=16, layers=1, vocab=None, vocab_unpadded=None,
         di=32, N=8, R=1, R_config="auto", K=4, bias=False, conv_bias=True, tied=False, mamba_ssm=False,
         tokenizer=True),
]

# ---------------------------------------------------------------------------------------------
# The hand-made GPT-NeoX-style byte-level BPE tokenizer
# ---------------------------------------------------------------------------------------------

ENDOFTEXT = "<|endoftext|>"
# Each merge joins two symbols already in the vocabulary; "Ã ©" is "é" (bytes C3 A9) in the
# byte-level alphabet, so one merge spans a multi-byte character.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a n", "Ġ w",
          "in g", "Ġ o", "Ġa n", "Ġan d", "Ã ©"]
# Texts of the bytebpe prompts, chosen so that they encode to 1, 7 and 13 tokens.
BYTEBPE_TEXTS = [" the", "the café", " the café and 🐍!"]


def byte_to_unicode():
    """GPT-2's reversible byte ↔ printable-character map: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the code points 256, 257, … in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer():
    """Vocabulary: id 0 <|endoftext|>, ids 1..256 the byte b at id b + 1, then one id per merge."""
    b2u = byte_to_unicode()
    vocab = {ENDOFTEXT: 0}
    for b in range(256):
        vocab[b2u[b]] = b + 1
    for merge in MERGES:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab, merge
        vocab[left + right] = len(vocab)
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 0, "content": ENDOFTEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": MERGES},
    }
    return tokenizer


def pretokenize(text):
    """GPT-2's split pattern  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    written with Python's re ([^\\W\\d_] is a letter); enough for the ASCII, accented and emoji
    texts used here (checked against @huggingface/tokenizers when the fixtures were made)."""
    import re
    letter = r"[^\W\d_]"
    pattern = re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d| ?" + letter + r"+| ?\d+| ?(?:(?!" + letter + r")[^\s\d])+|\s+(?!\S)|\s+")
    return pattern.findall(text)


def bpe_encode(tokenizer, text):
    import unicodedata
    b2u = byte_to_unicode()
    vocab = tokenizer["model"]["vocab"]
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(tokenizer["model"]["merges"])}
    ids = []
    for word in pretokenize(unicodedata.normalize("NFC", text)):
        symbols = [b2u[b] for b in word.encode("utf-8")]
        while len(symbols) > 1:
            # merge the adjacent pair with the lowest rank, leftmost first
            best = min(range(len(symbols) - 1),
                       key=lambda i: ranks.get((symbols[i], symbols[i + 1]), math.inf))
            if (symbols[best], symbols[best + 1]) not in ranks:
                break
            symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
        ids.extend(vocab[s] for s in symbols)
    return ids


# ---------------------------------------------------------------------------------------------
# Random weights (realistic initialisation)
# ---------------------------------------------------------------------------------------------

def f32(array):
    return np.ascontiguousarray(np.asarray(array, dtype=np.float64).astype(np.float32))


def inverse_softplus(y):
    # softplus(x) = y  ⇔  x = y + log(1 − e^(−y))
    return y + np.log(-np.expm1(-y))


def dt_bias_init(rng, count):
    """Mamba's Δ init: Δ log-uniform in [1e-3, 1e-1], floored at 1e-4, stored as softplus⁻¹(Δ)."""
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), size=count))
    return inverse_softplus(np.maximum(dt, 1e-4))


def make_weights(spec):
    """Weights under HF-like short names (A_log, not A): float32 numpy arrays."""
    rng = np.random.default_rng(spec["seed"])
    d, V, K = spec["d"], spec["vocab"], spec["K"]
    normal = lambda shape, std: rng.normal(0.0, std, size=shape)
    w = {}
    w["embeddings"] = f32(normal((V, d), 0.3))
    w["norm_f"] = f32(1.0 + normal((d,), 0.1))
    if not spec["tied"]:
        w["lm_head"] = f32(normal((V, d), 0.25))
    for i in range(spec["layers"]):
        p = f"layers.{i}."
        w[p + "norm"] = f32(1.0 + normal((d,), 0.1))
        if spec["arch"] == "mamba1":
            di, N, R = spec["di"], spec["N"], spec["R"]
            rows, channels = 2 * di, di
            # B and C rows larger than the Δ rows so that the recurrence carries a sizeable share of
            # y (with Δ ≈ 0.02 and D ≈ 1 it would otherwise hide behind D·x)
            w[p + "x_proj"] = f32(np.concatenate([normal((R, di), 0.15), normal((2 * N, di), BC_STD)]))
            # dt_proj init: uniform(±R^-1/2) as Mamba's "random" dt init
            w[p + "dt_proj"] = f32(rng.uniform(-R ** -0.5, R ** -0.5, size=(di, R)))
            w[p + "dt_bias"] = f32(dt_bias_init(rng, di))
            # S4D-real: A_log[c, n] = log(n + 1) for every channel
            w[p + "A_log"] = f32(np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (di, 1))))
            w[p + "D"] = f32(rng.uniform(0.5, 1.5, size=di))
        else:
            H, P, G, N = spec["H"], spec["P"], spec["G"], spec["N"]
            di = H * P
            rows, channels = 2 * di + 2 * G * N + H, di + 2 * G * N
            w[p + "dt_bias"] = f32(dt_bias_init(rng, H))
            w[p + "A_log"] = f32(np.log(rng.uniform(1.0, 16.0, size=H)))
            w[p + "D"] = f32(rng.uniform(0.5, 1.5, size=H))
            w[p + "ssm_norm"] = f32(1.0 + normal((di,), 0.1))
        in_proj = normal((rows, d), 0.2)
        if spec["arch"] == "mamba2":
            di = spec["H"] * spec["P"]
            in_proj[2 * di:2 * di + 2 * spec["G"] * spec["N"]] *= BC_STD / 0.2   # the B and C rows, as above
        w[p + "in_proj"] = f32(in_proj)
        if spec["bias"]:
            w[p + "in_proj_bias"] = f32(normal((rows,), 0.05))
        w[p + "conv"] = f32(normal((channels, K), 0.3))
        if spec["conv_bias"]:
            w[p + "conv_bias"] = f32(normal((channels,), 0.1))
        # Mamba-2's gated norm hands out_proj rows of RMS ≈ 1, Mamba-1's y·silu(z) is smaller: scale so
        # that each mixer adds about as much as the embedding to the residual stream
        out_std = (1.0 if spec["arch"] == "mamba2" else 4.0) / math.sqrt(di)
        w[p + "out_proj"] = f32(normal((d, di), out_std))
        if spec["bias"]:
            w[p + "out_proj_bias"] = f32(normal((d,), 0.05))
    return w


# ---------------------------------------------------------------------------------------------
# The float64 reference (DESIGN.md, written out again)
# ---------------------------------------------------------------------------------------------

def t64(array):
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


def silu(v):
    return v * torch.sigmoid(v)


def softplus(v):
    # DESIGN.md: softplus(x) = x for x > 20
    return torch.where(v > 20, v, torch.log1p(torch.exp(torch.clamp(v, max=20))))


def rmsnorm(v, weight):
    return v * torch.rsqrt(torch.mean(v * v, dim=-1, keepdim=True) + NORM_EPS) * weight


def linear(v, weight, bias=None):
    out = v @ weight.T
    return out if bias is None else out + bias


def causal_conv(v, weight, bias):
    """v [L, C], weight [C, K]: depthwise conv padded with K−1 zeros in front, first L outputs kept."""
    L, C = v.shape
    K = weight.shape[1]
    out = F.conv1d(v.T.unsqueeze(0), weight.unsqueeze(1), bias, padding=K - 1, groups=C)[0, :, :L].T
    return out


def mamba1_mixer(w, p, spec, hn, stats):
    di, N, R = spec["di"], spec["N"], spec["R"]
    xz = linear(hn, w[p + "in_proj"], w.get(p + "in_proj_bias"))
    x, z = xz[:, :di], xz[:, di:]
    x = silu(causal_conv(x, w[p + "conv"], w.get(p + "conv_bias")))
    dbc = linear(x, w[p + "x_proj"])
    dt_low, B, C = dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]
    dt = softplus(linear(dt_low, w[p + "dt_proj"]) + w[p + "dt_bias"])   # [L, di]
    A = -torch.exp(w[p + "A_log"])                                        # [di, N]
    state = torch.zeros(di, N, dtype=torch.float64)
    ys, state_terms = [], []
    for t in range(hn.shape[0]):
        # s_t = exp(Δ_t·A) ⊙ s_{t−1} + (Δ_t·x_t) ⊗ B_t;  y_t = s_t·C_t + D ⊙ x_t
        state = torch.exp(dt[t][:, None] * A) * state + (dt[t] * x[t])[:, None] * B[t][None, :]
        state_term = state @ C[t]
        state_terms.append(state_term)
        ys.append(state_term + w[p + "D"] * x[t])
    y = torch.stack(ys)
    stats.setdefault("state_share", []).append(float(torch.stack(state_terms).norm() / y.norm()))
    stats.setdefault("dt_mean", []).append(float(dt.mean()))
    y = y * silu(z)
    return linear(y, w[p + "out_proj"], w.get(p + "out_proj_bias"))


def ssd_sequential(x, dt, A, B, C):
    """x [L, H, P], dt [L, H], A [H], B/C [L, H, N] (already expanded per head).
    s_t[h] = exp(Δ_t[h]·A[h])·s_{t−1}[h] + Δ_t[h]·x_t[h] ⊗ B_t[h];  y_t[h] = s_t[h]·C_t[h]."""
    L, H, P = x.shape
    N = B.shape[2]
    state = torch.zeros(H, P, N, dtype=torch.float64)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[t] * A)[:, None, None]
        state = decay * state + (dt[t][:, None] * x[t])[:, :, None] * B[t][:, None, :]
        ys.append(torch.einsum("hpn,hn->hp", state, C[t]))
    return torch.stack(ys), state


def ssd_chunked(x, dt, A, B, C, Q):
    """The same y by the chunked SSD algorithm (chunks of Q, the last one shorter when Q ∤ L):
    intra-chunk  y_i += Σ_{j≤i} exp(a_i − a_j)·(C_i·B_j)·Δ_j·x_j   (a = cumulative Δ·A in the chunk),
    state→output y_i += exp(a_i)·(s_in·C_i),
    chunk state  s_out = exp(a_last)·s_in + Σ_j exp(a_last − a_j)·Δ_j·x_j ⊗ B_j."""
    L, H, P = x.shape
    N = B.shape[2]
    state = torch.zeros(H, P, N, dtype=torch.float64)
    out = []
    for start in range(0, L, Q):
        end = min(start + Q, L)
        xc, dtc, Bc, Cc = x[start:end], dt[start:end], B[start:end], C[start:end]
        a = torch.cumsum(dtc * A, dim=0)                                 # [l, H]
        segment = a[:, None, :] - a[None, :, :]                          # [i, j, H] = a_i − a_j
        causal = torch.tril(torch.ones(end - start, end - start, dtype=torch.bool))[:, :, None]
        decay = torch.exp(torch.where(causal, segment, torch.tensor(-math.inf, dtype=torch.float64)))
        scores = torch.einsum("ihn,jhn->ijh", Cc, Bc) * decay
        y = torch.einsum("ijh,jh,jhp->ihp", scores, dtc, xc)
        y = y + torch.exp(a)[:, :, None] * torch.einsum("hpn,ihn->ihp", state, Cc)
        tail = torch.exp(a[-1][None, :] - a)                             # [l, H]
        state = torch.exp(a[-1])[:, None, None] * state + \
            torch.einsum("jh,jh,jhp,jhn->hpn", tail, dtc, xc, Bc)
        out.append(y)
    return torch.cat(out), state


def mamba2_mixer(w, p, spec, hn, stats):
    H, P, G, N = spec["H"], spec["P"], spec["G"], spec["N"]
    di = H * P
    L = hn.shape[0]
    zxbcdt = linear(hn, w[p + "in_proj"], w.get(p + "in_proj_bias"))
    z, xbc, dt = zxbcdt[:, :di], zxbcdt[:, di:2 * di + 2 * G * N], zxbcdt[:, 2 * di + 2 * G * N:]
    xbc = silu(causal_conv(xbc, w[p + "conv"], w.get(p + "conv_bias")))
    x = xbc[:, :di].reshape(L, H, P)
    B = xbc[:, di:di + G * N].reshape(L, G, N)
    C = xbc[:, di + G * N:].reshape(L, G, N)
    # head h reads group h // (H / G)
    group_of_head = torch.arange(H) // (H // G)
    B, C = B[:, group_of_head], C[:, group_of_head]
    dt_raw = softplus(dt + w[p + "dt_bias"])
    low, high = spec["limit"]
    dt = torch.clamp(dt_raw, min=low, max=high)
    stats.setdefault("clamped_fraction", []).append(float(((dt_raw < low) | (dt_raw > high)).double().mean()))
    stats.setdefault("dt_mean", []).append(float(dt.mean()))
    A = -torch.exp(w[p + "A_log"])
    y_state, final_state = ssd_sequential(x, dt, A, B, C)
    y_chunked, final_chunked = ssd_chunked(x, dt, A, B, C, spec["Q"])
    gap = max(float((y_state - y_chunked).abs().max()), float((final_state - final_chunked).abs().max()))
    assert gap < 1e-10, f"{spec['name']}: chunked SSD disagrees with the recurrence by {gap}"
    stats["ssd_gap"] = max(stats.get("ssd_gap", 0.0), gap)
    y = y_state + w[p + "D"][:, None] * x
    stats.setdefault("state_share", []).append(float(y_state.norm() / y.norm()))
    y = y.reshape(L, di)
    # gated RMSNorm over groups of di/G: rmsnorm(y·silu(z))·w
    gated = (y * silu(z)).reshape(L, G, di // G)
    gated = gated * torch.rsqrt(torch.mean(gated * gated, dim=-1, keepdim=True) + NORM_EPS)
    y = gated.reshape(L, di) * w[p + "ssm_norm"]
    return linear(y, w[p + "out_proj"], w.get(p + "out_proj_bias"))


def forward(spec, weights, ids, stats=None):
    """Logits [L, V] for token ids, float64."""
    stats = {} if stats is None else stats
    w = {name: t64(value) for name, value in weights.items()}
    h = w["embeddings"][torch.tensor(ids, dtype=torch.long)]
    residual = None
    mixer = mamba1_mixer if spec["arch"] == "mamba1" else mamba2_mixer
    for i in range(spec["layers"]):
        p = f"layers.{i}."
        residual = h if residual is None else h + residual
        h = mixer(w, p, spec, rmsnorm(residual, w[p + "norm"]), stats)
    residual = h + residual
    head = w["embeddings"] if spec["tied"] else w["lm_head"]
    return linear(rmsnorm(residual, w["norm_f"]), head)


def forward_by_steps(spec, weights, ids):
    """The same logits as forward(), one token at a time as a decoder runs: each layer keeps the
    last K−1 conv inputs and the SSM state. A cross-check of the padded convolution and of the scan."""
    w = {name: t64(value) for name, value in weights.items()}
    K = spec["K"]
    conv_windows, states = {}, {}
    rows = []
    for token in ids:
        h = w["embeddings"][token]
        residual = None
        for i in range(spec["layers"]):
            p = f"layers.{i}."
            residual = h if residual is None else h + residual
            hn = rmsnorm(residual, w[p + "norm"])
            projected = linear(hn, w[p + "in_proj"], w.get(p + "in_proj_bias"))
            if spec["arch"] == "mamba1":
                di, N, R = spec["di"], spec["N"], spec["R"]
                conv_in, z = projected[:di], projected[di:]
            else:
                H, P, G, N = spec["H"], spec["P"], spec["G"], spec["N"]
                di = H * P
                z, conv_in, dt_in = projected[:di], projected[di:2 * di + 2 * G * N], projected[2 * di + 2 * G * N:]
            window = conv_windows.get(i, torch.zeros(K - 1, conv_in.shape[0], dtype=torch.float64))
            window = torch.cat([window, conv_in[None]])              # [K, C], oldest first
            conv_windows[i] = window[1:]
            conv_out = (window.T * w[p + "conv"]).sum(dim=1)
            if p + "conv_bias" in w:
                conv_out = conv_out + w[p + "conv_bias"]
            conv_out = silu(conv_out)
            if spec["arch"] == "mamba1":
                x = conv_out
                dbc = linear(x, w[p + "x_proj"])
                dt = softplus(linear(dbc[:R], w[p + "dt_proj"]) + w[p + "dt_bias"])
                B, C = dbc[R:R + N], dbc[R + N:]
                A = -torch.exp(w[p + "A_log"])
                state = states.get(i, torch.zeros(di, N, dtype=torch.float64))
                state = torch.exp(dt[:, None] * A) * state + (dt * x)[:, None] * B[None, :]
                states[i] = state
                y = (state @ C + w[p + "D"] * x) * silu(z)
            else:
                x = conv_out[:di].reshape(H, P)
                heads_per_group = H // G
                B = conv_out[di:di + G * N].reshape(G, N).repeat_interleave(heads_per_group, dim=0)
                C = conv_out[di + G * N:].reshape(G, N).repeat_interleave(heads_per_group, dim=0)
                dt = torch.clamp(softplus(dt_in + w[p + "dt_bias"]), min=spec["limit"][0], max=spec["limit"][1])
                A = -torch.exp(w[p + "A_log"])
                state = states.get(i, torch.zeros(H, P, N, dtype=torch.float64))
                state = torch.exp(dt * A)[:, None, None] * state + (dt[:, None] * x)[:, :, None] * B[:, None, :]
                states[i] = state
                y = (torch.einsum("hpn,hn->hp", state, C) + w[p + "D"][:, None] * x).reshape(di)
                gated = (y * silu(z)).reshape(G, di // G)
                y = (gated * torch.rsqrt(torch.mean(gated * gated, dim=-1, keepdim=True) + NORM_EPS)).reshape(di)
                y = y * w[p + "ssm_norm"]
            h = linear(y, w[p + "out_proj"], w.get(p + "out_proj_bias"))
        residual = h + residual
        head = w["embeddings"] if spec["tied"] else w["lm_head"]
        rows.append(linear(rmsnorm(residual, w["norm_f"]), head))
    return torch.stack(rows)


def greedy(spec, weights, prompt):
    """GREEDY_STEPS argmax tokens after the prompt, and the smallest top-1 − top-2 logit gap seen."""
    ids = list(prompt)
    smallest_gap = math.inf
    for _ in range(GREEDY_STEPS):
        last = forward(spec, weights, ids)[-1]
        top = torch.topk(last, 2).values
        smallest_gap = min(smallest_gap, float(top[0] - top[1]))
        ids.append(int(torch.argmax(last)))
    return ids[len(prompt):], smallest_gap


# ---------------------------------------------------------------------------------------------
# Q8_0 as ggml quantises it
# ---------------------------------------------------------------------------------------------

def round_half_away(v):
    # C's roundf, exactly (np.round rounds half to even)
    magnitude = np.abs(v)
    floored = np.floor(magnitude)
    return np.sign(v) * (floored + np.floor(2 * (magnitude - floored)))


def quantize_q8_0(matrix):
    """Blocks of 32 along the rows (the input dimension): d = amax/127 in float32, q = roundf(x·(1/d)),
    d stored as fp16. Returns (bytes, dequantised float32 matrix); the dequantised values are exact
    in float32 (fp16 × int8)."""
    rows, cols = matrix.shape
    assert cols % 32 == 0
    blocks = matrix.astype(np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = round_half_away((blocks * inverse).astype(np.float32)).astype(np.int8)
    d16 = d.astype(np.float16)
    packed = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    packed[:, :2] = d16.view(np.uint8).reshape(-1, 2)
    packed[:, 2:] = q.view(np.uint8)
    dequantised = (d16.astype(np.float32) * q.astype(np.float32)).astype(np.float32).reshape(rows, cols)
    return packed.tobytes(), dequantised


MATRIX_SUFFIXES = ("in_proj", "x_proj", "dt_proj", "out_proj")


def is_matrix(name):
    return name in ("embeddings", "lm_head") or name.split(".")[-1] in MATRIX_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Writers: safetensors and GGUF, by hand
# ---------------------------------------------------------------------------------------------

def write_atomic(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def safetensors_bytes(tensors):
    """tensors: {name: float32 array}. 8-byte LE header length, JSON header padded with spaces to
    a multiple of 8, then the data in header order."""
    header = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY = 4, 5, 6, 7, 8, 9
GGML_F32, GGML_Q8_0 = 0, 8
GGUF_ALIGNMENT = 32


def gguf_string(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def gguf_scalar(kind, value):
    if kind == GGUF_UINT32:
        return struct.pack("<I", value)
    if kind == GGUF_INT32:
        return struct.pack("<i", value)
    if kind == GGUF_FLOAT32:
        return struct.pack("<f", value)
    if kind == GGUF_BOOL:
        return struct.pack("<B", 1 if value else 0)
    if kind == GGUF_STRING:
        return gguf_string(value)
    raise ValueError(kind)


def gguf_value(kind, value):
    """kind: a scalar type, or (GGUF_ARRAY, element type)."""
    if isinstance(kind, tuple):
        element = kind[1]
        body = b"".join(gguf_scalar(element, item) for item in value)
        return struct.pack("<IIQ", GGUF_ARRAY, element, len(value)) + body
    return struct.pack("<I", kind) + gguf_scalar(kind, value)


def gguf_bytes(metadata, tensors):
    """metadata: [(key, kind, value)]; tensors: [(name, ggml type, PyTorch shape, raw bytes)].
    Version 3; tensor dims in ggml order (the PyTorch shape reversed); data aligned to 32."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, kind, value in metadata:
        out += gguf_string(key) + gguf_value(kind, value)
    offset = 0
    for name, kind, shape, raw in tensors:
        dims = list(reversed(shape))
        out += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, offset)
        offset += len(raw) + (-len(raw) % GGUF_ALIGNMENT)
    out += b"\0" * (-len(out) % GGUF_ALIGNMENT)
    for _, _, _, raw in tensors:
        out += raw + b"\0" * (-len(raw) % GGUF_ALIGNMENT)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# The layouts
# ---------------------------------------------------------------------------------------------

def hf_names(spec, weights, embedding="backbone.embeddings.weight"):
    """HF MambaForCausalLM / Mamba2ForCausalLM tensor names (mamba_ssm: embedding singular)."""
    out = {}
    for name, value in weights.items():
        if name == "embeddings":
            out[embedding] = value
        elif name == "norm_f":
            out["backbone.norm_f.weight"] = value
        elif name == "lm_head":
            out["lm_head.weight"] = value
        else:
            _, i, short = name.split(".", 2)
            mixer = f"backbone.layers.{i}.mixer."
            mapped = {
                "norm": f"backbone.layers.{i}.norm.weight",
                "in_proj": mixer + "in_proj.weight", "in_proj_bias": mixer + "in_proj.bias",
                "conv": mixer + "conv1d.weight", "conv_bias": mixer + "conv1d.bias",
                "x_proj": mixer + "x_proj.weight", "dt_proj": mixer + "dt_proj.weight",
                "dt_bias": mixer + ("dt_proj.bias" if spec["arch"] == "mamba1" else "dt_bias"),
                "A_log": mixer + "A_log", "D": mixer + "D", "ssm_norm": mixer + "norm.weight",
                "out_proj": mixer + "out_proj.weight", "out_proj_bias": mixer + "out_proj.bias",
            }[short]
            if short == "conv":
                value = value[:, None, :]  # conv1d.weight is [channels, 1, K]
            out[mapped] = value
    return out


def hf_config(spec):
    if spec["arch"] == "mamba1":
        config = {
            "architectures": ["MambaForCausalLM"], "model_type": "mamba",
            "vocab_size": spec["vocab"], "hidden_size": spec["d"], "state_size": spec["N"],
            "num_hidden_layers": spec["layers"], "layer_norm_epsilon": NORM_EPS,
            "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0,
            "expand": spec["di"] // spec["d"], "conv_kernel": spec["K"],
            "use_bias": spec["bias"], "use_conv_bias": spec["conv_bias"], "hidden_act": "silu",
            "initializer_range": 0.1, "residual_in_fp32": True, "time_step_rank": spec["R_config"],
            "time_step_scale": 1.0, "time_step_min": 0.001, "time_step_max": 0.1,
            "time_step_init_scheme": "random", "time_step_floor": 0.0001,
            "rescale_prenorm_residual": False, "use_cache": True,
            "intermediate_size": spec["di"], "tie_word_embeddings": spec["tied"], "torch_dtype": "float32",
        }
        if spec["R_config"] == "auto":
            # the "auto" configs also leave intermediate_size to expand·hidden_size
            del config["intermediate_size"]
        return config
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "num_heads": spec["H"], "head_dim": spec["P"], "vocab_size": spec["vocab"],
        "hidden_size": spec["d"], "state_size": spec["N"], "num_hidden_layers": spec["layers"],
        "layer_norm_epsilon": NORM_EPS, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "expand": spec["H"] * spec["P"] // spec["d"], "conv_kernel": spec["K"], "n_groups": spec["G"],
        "use_bias": spec["bias"], "use_conv_bias": spec["conv_bias"], "hidden_act": "silu",
        "initializer_range": 0.1, "residual_in_fp32": True, "time_step_rank": "auto",
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001,
        "time_step_limit": list(spec["limit"]), "rescale_prenorm_residual": False, "use_cache": True,
        "rms_norm": True, "norm_before_gate": False, "chunk_size": spec["Q"],
        "tie_word_embeddings": spec["tied"], "torch_dtype": "float32",
    }


def pad_multiple(spec):
    """The pad_vocab_size_multiple that takes the unpadded vocabulary up to the weights' rows."""
    for multiple in (8, 16):
        if -(-spec["vocab_unpadded"] // multiple) * multiple == spec["vocab"]:
            return multiple
    raise ValueError(spec["name"])


def mamba_ssm_config(spec):
    if spec["arch"] == "mamba1":
        ssm = {"layer": "Mamba1", "d_state": spec["N"], "d_conv": spec["K"], "expand": spec["di"] // spec["d"],
               "dt_rank": spec["R"], "bias": spec["bias"], "conv_bias": spec["conv_bias"]}
    else:
        ssm = {"layer": "Mamba2", "d_state": spec["N"], "d_conv": spec["K"],
               "expand": spec["H"] * spec["P"] // spec["d"], "headdim": spec["P"], "ngroups": spec["G"],
               "chunk_size": spec["Q"], "bias": spec["bias"], "conv_bias": spec["conv_bias"],
               "rmsnorm": True, "norm_before_gate": False}
    return {"d_model": spec["d"], "d_intermediate": 0, "n_layer": spec["layers"],
            "vocab_size": spec["vocab_unpadded"], "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
            "pad_vocab_size_multiple": pad_multiple(spec), "tie_embeddings": spec["tied"]}


def gguf_tensors(spec, weights, quantize):
    """llama.cpp's names and layout. Returns (tensor list, weights as the file holds them after
    dequantisation, for the expected logits)."""
    arch2 = spec["arch"] == "mamba2"
    tensors, effective = [], dict(weights)

    def add(name, value, source=None):
        value = np.asarray(value, dtype=np.float32)
        if quantize and source is not None and is_matrix(source) and value.shape[-1] % 32 == 0:
            raw, dequantised = quantize_q8_0(value)
            effective[source] = dequantised
            tensors.append((name, GGML_Q8_0, list(value.shape), raw))
        else:
            tensors.append((name, GGML_F32, list(value.shape), np.ascontiguousarray(value, dtype="<f4").tobytes()))

    add("token_embd.weight", weights["embeddings"], "embeddings")
    add("output_norm.weight", weights["norm_f"])
    if not spec["tied"]:
        add("output.weight", weights["lm_head"], "lm_head")
    for i in range(spec["layers"]):
        p, b = f"layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", weights[p + "norm"])
        add(b + "ssm_in.weight", weights[p + "in_proj"], p + "in_proj")
        if spec["bias"]:
            add(b + "ssm_in.bias", weights[p + "in_proj_bias"])
        add(b + "ssm_conv1d.weight", weights[p + "conv"])
        if spec["conv_bias"]:
            add(b + "ssm_conv1d.bias", weights[p + "conv_bias"])
        # llama.cpp stores A itself: ssm_a = −exp(A_log), computed in float32
        a = -np.exp(weights[p + "A_log"].astype(np.float32))
        if arch2:
            H, G = spec["H"], spec["G"]
            add(b + "ssm_dt.bias", weights[p + "dt_bias"])
            add(b + "ssm_a", a.reshape(H, 1))
            add(b + "ssm_d", weights[p + "D"].reshape(H, 1))
            add(b + "ssm_norm.weight", weights[p + "ssm_norm"].reshape(G, -1))
        else:
            add(b + "ssm_x.weight", weights[p + "x_proj"], p + "x_proj")
            add(b + "ssm_dt.weight", weights[p + "dt_proj"], p + "dt_proj")
            add(b + "ssm_dt.bias", weights[p + "dt_bias"])
            add(b + "ssm_a", a)
            add(b + "ssm_d", weights[p + "D"])
        add(b + "ssm_out.weight", weights[p + "out_proj"], p + "out_proj")
        if spec["bias"]:
            add(b + "ssm_out.bias", weights[p + "out_proj_bias"])
    return tensors, effective


def gguf_metadata(spec, quantized, tokenizer):
    arch = "mamba" if spec["arch"] == "mamba1" else "mamba2"
    di = spec["di"] if spec["arch"] == "mamba1" else spec["H"] * spec["P"]
    meta = [
        ("general.architecture", GGUF_STRING, arch),
        ("general.name", GGUF_STRING, spec["name"]),
        ("general.file_type", GGUF_UINT32, 7 if quantized else 0),  # MOSTLY_Q8_0 / ALL_F32
    ]
    if quantized:
        meta.append(("general.quantization_version", GGUF_UINT32, 2))
    meta += [
        (f"{arch}.context_length", GGUF_UINT32, 1 << 20),
        (f"{arch}.embedding_length", GGUF_UINT32, spec["d"]),
        (f"{arch}.feed_forward_length", GGUF_UINT32, 0),
        (f"{arch}.attention.head_count", GGUF_UINT32, 0),
        (f"{arch}.block_count", GGUF_UINT32, spec["layers"]),
        (f"{arch}.ssm.conv_kernel", GGUF_UINT32, spec["K"]),
        (f"{arch}.ssm.inner_size", GGUF_UINT32, di),
        (f"{arch}.ssm.state_size", GGUF_UINT32, spec["N"]),
        (f"{arch}.ssm.time_step_rank", GGUF_UINT32, spec["R"] if spec["arch"] == "mamba1" else spec["H"]),
        (f"{arch}.attention.layer_norm_rms_epsilon", GGUF_FLOAT32, NORM_EPS),
    ]
    if spec["arch"] == "mamba1":
        meta.append((f"{arch}.ssm.dt_b_c_rms", GGUF_BOOL, False))
    else:
        meta.append((f"{arch}.ssm.group_count", GGUF_UINT32, spec["G"]))
        # Not llama.cpp keys (llama.cpp never clamps Δ and picks its own chunking): this project's
        # extensions, written only when the value differs from the default (chunk 256, limit [0, inf]).
        if spec["Q"] != 256:
            meta.append((f"{arch}.ssm.chunk_size", GGUF_UINT32, spec["Q"]))
        if tuple(spec["limit"]) != (0.0, math.inf):
            meta.append((f"{arch}.ssm.time_step_limit", (GGUF_ARRAY, GGUF_FLOAT32), list(spec["limit"])))
    if tokenizer is None:
        # llama.cpp's spelling for "no vocabulary in this file"
        meta.append(("tokenizer.ggml.model", GGUF_STRING, "no_vocab"))
    else:
        vocab = tokenizer["model"]["vocab"]
        by_id = {index: token for token, index in vocab.items()}
        tokens, types = [], []
        for index in range(spec["vocab"]):
            if index in by_id:
                tokens.append(by_id[index])
                types.append(3 if by_id[index] == ENDOFTEXT else 1)   # CONTROL / NORMAL
            else:
                tokens.append(f"[PAD{index}]")                          # llama.cpp's vocabulary padding
                types.append(5)                                         # UNUSED
        meta += [
            ("tokenizer.ggml.model", GGUF_STRING, "gpt2"),
            ("tokenizer.ggml.pre", GGUF_STRING, "gpt-2"),
            ("tokenizer.ggml.tokens", (GGUF_ARRAY, GGUF_STRING), tokens),
            ("tokenizer.ggml.token_type", (GGUF_ARRAY, GGUF_INT32), types),
            ("tokenizer.ggml.merges", (GGUF_ARRAY, GGUF_STRING), tokenizer["model"]["merges"]),
            ("tokenizer.ggml.bos_token_id", GGUF_UINT32, 0),
            ("tokenizer.ggml.eos_token_id", GGUF_UINT32, 0),
        ]
    return meta


def normalised_config(spec):
    """The MambaConfig fields (lib/models/config.ts) that the architecture uses."""
    c = {"architecture": spec["arch"], "hiddenSize": spec["d"], "numLayers": spec["layers"],
         "vocabSize": spec["vocab"], "stateSize": spec["N"], "convKernel": spec["K"],
         "useBias": spec["bias"], "useConvBias": spec["conv_bias"], "normEps": NORM_EPS,
         "tieEmbeddings": spec["tied"]}
    if spec["arch"] == "mamba1":
        c.update(intermediateSize=spec["di"], timeStepRank=spec["R"])
    else:
        c.update(intermediateSize=spec["H"] * spec["P"], numHeads=spec["H"], headDim=spec["P"],
                 numGroups=spec["G"], chunkSize=spec["Q"], timeStepLimit=list(spec["limit"]),
                 normBeforeGate=False)
    return c


# ---------------------------------------------------------------------------------------------
# JSON: 9 significant digits, infinity as 1e999 (valid JSON; JSON.parse and json.loads give Infinity)
# ---------------------------------------------------------------------------------------------

def format_number(value):
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    assert not math.isnan(value)
    text = "%.9g" % value
    return text


def compact_json(value):
    """Strict, compact JSON with floats to 9 significant digits (float32 needs 9 to round-trip)."""
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + compact_json(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(compact_json(v) for v in value) + "]"
    if isinstance(value, float):
        return format_number(value)
    return json.dumps(value, ensure_ascii=False)


def tokenizer_json(tokenizer):
    return (json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def hf_json(value):
    """config.json as transformers 4 writes it: indent 2, sorted keys, Python's Infinity."""
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def logit_rows(logits):
    return [float(v) for v in logits.reshape(-1)]


def build_model(spec, tokenizer, folder, report):
    weights = make_weights(spec)
    rng = np.random.default_rng(spec["seed"] + 7)
    if spec.get("tokenizer"):
        prompts = [bpe_encode(tokenizer, text) for text in BYTEBPE_TEXTS]
        assert [len(p) for p in prompts] == list(PROMPT_LENGTHS), [len(p) for p in prompts]
    else:
        prompts = [[int(v) for v in rng.integers(0, spec["vocab_unpadded"], size=n)] for n in PROMPT_LENGTHS]

    stats = {}   # diagnostics of the longest prompt
    logits = [forward(spec, weights, p, stats if len(p) == max(PROMPT_LENGTHS) else None) for p in prompts]
    step_gap = max(float((forward_by_steps(spec, weights, p) - l).abs().max()) for p, l in zip(prompts, logits))
    assert step_gap < 1e-10, f"{spec['name']}: token-by-token logits differ from the whole-prompt ones by {step_gap}"
    continuations = [greedy(spec, weights, p) for p in prompts]
    all_logits = torch.cat(logits)
    expected = {
        "config": normalised_config(spec),
        "files": {},
        "prompts": prompts,
        "logits": [logit_rows(l) for l in logits],
        "greedy": [c[0] for c in continuations],
    }
    if spec.get("tokenizer"):
        expected["texts"] = BYTEBPE_TEXTS
    info = {"name": spec["name"], "logit_std": float(all_logits.std()),
            "logit_min": float(all_logits.min()), "logit_max": float(all_logits.max()),
            "min_greedy_gap": min(c[1] for c in continuations),
            "distinct_greedy": [len(set(c[0])) for c in continuations],
            "state_share": float(np.mean(stats["state_share"])), "step_gap": step_gap, "dt_mean": float(np.mean(stats["dt_mean"]))}
    if "ssd_gap" in stats:
        info["ssd_gap"] = stats["ssd_gap"]
    if spec["arch"] == "mamba2":
        info["clamped_fraction"] = float(np.mean(stats["clamped_fraction"]))
        if tuple(spec["limit"]) != (0.0, math.inf):
            unclamped = dict(spec, limit=(0.0, math.inf))
            info["clamp_effect"] = float(max((forward(unclamped, weights, p) - l).abs().max()
                                             for p, l in zip(prompts, logits)))
    # the fixtures must not be degenerate
    assert 0.3 < info["logit_std"] < 5, info
    # seeds were picked so that no continuation is stuck on one or two tokens and no greedy step is
    # close to a tie (float32 logits are good to ~1e-5; the gap must dwarf that)
    assert all(n >= 3 for n in info["distinct_greedy"]), info
    assert info["min_greedy_gap"] > 2e-3, info

    # Hugging Face folder
    hf = hf_names(spec, weights)
    write_atomic(os.path.join(folder, "hf", "config.json"), hf_json(hf_config(spec)).encode())
    write_atomic(os.path.join(folder, "hf", "model.safetensors"), safetensors_bytes(hf))
    expected["files"]["hf"] = "logits"
    if spec.get("tokenizer"):
        write_atomic(os.path.join(folder, "hf", "tokenizer.json"), tokenizer_json(tokenizer))
    # mamba_ssm folder
    if spec["mamba_ssm"]:
        ssm = hf_names(spec, weights, embedding="backbone.embedding.weight")
        write_atomic(os.path.join(folder, "mamba_ssm", "config.json"), hf_json(mamba_ssm_config(spec)).encode())
        write_atomic(os.path.join(folder, "mamba_ssm", "model.safetensors"), safetensors_bytes(ssm))
        expected["files"]["mamba_ssm"] = "logits"
    # GGUF, F32
    tensors, _ = gguf_tensors(spec, weights, quantize=False)
    write_atomic(os.path.join(folder, "model.gguf"),
                 gguf_bytes(gguf_metadata(spec, False, tokenizer if spec.get("tokenizer") else None), tensors))
    expected["files"]["model.gguf"] = "logits"
    # GGUF, Q8_0 where some matrix has an input dimension that is a multiple of 32
    tensors, dequantised = gguf_tensors(spec, weights, quantize=True)
    quantized = [name for name, kind, _, _ in tensors if kind == GGML_Q8_0]
    if quantized:
        write_atomic(os.path.join(folder, "model-q8_0.gguf"),
                     gguf_bytes(gguf_metadata(spec, True, tokenizer if spec.get("tokenizer") else None), tensors))
        q_logits = [forward(spec, dequantised, p) for p in prompts]
        q_continuations = [greedy(spec, dequantised, p) for p in prompts]
        expected["logits_q8_0"] = [logit_rows(l) for l in q_logits]
        expected["greedy_q8_0"] = [c[0] for c in q_continuations]
        expected["q8_0_tensors"] = quantized
        expected["files"]["model-q8_0.gguf"] = "logits_q8_0"
        info["q8_0_tensors"] = len(quantized)
        info["q8_0_max_logit_shift"] = float(max((q - l).abs().max() for q, l in zip(q_logits, logits)))
        info["min_greedy_gap_q8_0"] = min(c[1] for c in q_continuations)
        assert info["min_greedy_gap_q8_0"] > 2e-3, info
    write_atomic(os.path.join(folder, "expected.json"), (compact_json(expected) + "\n").encode())
    report.append(info)


README = """# Model fixtures

Generated by `python3 scripts/make_fixtures.py` (run from the repository root; it rewrites this
folder, this file included, byte for byte the same on every run). Do not edit by hand.

Each folder is one small random language model with realistic initialisation (A_log = log(1..N) per
row for Mamba-1, log(uniform 1..16) per head for Mamba-2; dt_bias = softplus⁻¹ of a log-uniform Δ in
[1e-3, 1e-1]; D uniform 0.5..1.5; norms 1 + N(0, 0.1); matrices N(0, 0.15..0.3), with the rows that
make B and C at 0.5 so the recurrence carries 6–20 % of y instead of hiding behind D·x, and out_proj
scaled so each mixer adds about as much as the embedding to the residual stream), stored in float32,
and the output a correct implementation must give for it, computed by an independent float64
PyTorch reference written in the script from the equations of DESIGN.md, cross-checked there by a
token-by-token decoder (conv window and SSM state carried between tokens) and, for Mamba-2, by a
naive chunked SSD (both asserted equal to the whole-prompt recurrence within 1e-10).

{models}

Files in `<model>/`:

- `hf/config.json`, `hf/model.safetensors`: Hugging Face MambaForCausalLM / Mamba2ForCausalLM
  (F32; `conv1d.weight` [C, 1, K]; `A_log`; tied heads have no `lm_head.weight`). The config is
  written as transformers 4 writes it, so mamba2-tiny's says `"time_step_limit": [0.0, Infinity]`
  (Python's spelling, not strict JSON: a loader has to accept it). mamba1-tied and mamba1-bytebpe
  say `"time_step_rank": "auto"` and have no `intermediate_size` (it comes from `expand`).
  mamba1-bytebpe's `hf/` also holds `tokenizer.json` (a copy of `../tokenizer.json`).
- `mamba_ssm/config.json`, `mamba_ssm/model.safetensors` (mamba1-tiny and mamba2-tiny only): the
  state-spaces layout: unpadded `vocab_size` with `pad_vocab_size_multiple` (padded = the weights'
  rows), `ssm_cfg.layer` "Mamba1" / "Mamba2", `backbone.embedding.weight` (singular).
- `model.gguf`: llama.cpp's layout, version 3, alignment 32, everything F32: architectures `mamba` /
  `mamba2`, `ssm_a` = −exp(A_log) (float32), conv squeezed to [C, K], Mamba-2 `ssm_a` / `ssm_d` of
  shape [H, 1] (ggml dims (1, H)) and `ssm_norm.weight` [G, d_inner/G]. Beyond llama.cpp:
  `blk.i.ssm_in.bias` / `blk.i.ssm_out.bias` where the model has in/out_proj biases,
  `mamba2.ssm.chunk_size` (u32; both Mamba-2 models, as their chunk is not the default 256) and, in
  mamba2-groups1, `mamba2.ssm.time_step_limit` (float32 array [0.001, 0.05]): llama.cpp has no such
  keys, and the expected logits need the clamp. Models without a tokenizer say
  `tokenizer.ggml.model` = "no_vocab" (llama.cpp's spelling); mamba1-bytebpe carries the gpt2
  vocabulary (tokens padded to 280 with "[PAD{i}]" of type UNUSED, merges, bos = eos = 0).
- `model-q8_0.gguf`, where some matrix (token_embd, output, ssm_in, ssm_x, ssm_dt, ssm_out) has an
  input size that is a multiple of 32: those matrices in Q8_0 as ggml quantises (blocks of 32 along
  the input dimension, d = amax/127 in float32, q = roundf(x/d), d stored fp16), every other tensor
  F32 as in model.gguf (llama.cpp's converter falls back to F16 for a matrix it cannot quantise;
  F32 keeps these expected logits exact); file_type 7.
  Expected outputs from the dequantised weights. Which tensors: `q8_0_tensors` in expected.json.
- `expected.json` (compact JSON, numbers to 9 significant digits, infinity written `1e999`, which
  JSON.parse and json.loads read as Infinity):
  - `config`: the normalised MambaConfig fields (lib/models/config.ts) the architecture uses;
  - `files`: each checkpoint path in the folder → the key of the logits it must give;
  - `prompts`: 3 prompts of 1, 7 and 13 token ids (mamba1-bytebpe: `texts` encoded with
    `tokenizer.json`);
  - `logits`: per prompt, the fp64 logits of every position, flattened [L, vocab];
  - `greedy`: per prompt, the 8 ids that greedy decoding appends (argmax of the last position's
    logits, appended, repeated);
  - `logits_q8_0`, `greedy_q8_0`, `q8_0_tensors`: the same for `model-q8_0.gguf` and which GGUF
    tensors are Q8_0.

`tokenizer.json`: a hand-made GPT-NeoX-style byte-level BPE (NFC normaliser, ByteLevel
pre-tokenizer / post-processor / decoder): id 0 `<|endoftext|>` (special), ids 1..256 the 256 bytes
(byte b is id b + 1, in GPT-2's byte-level alphabet), ids 257..272 the results of its 16 merges
(one of them, "Ã ©", is "é"). 273 tokens.

Statistics of this generation (logits of all prompt positions; gap: the smallest top-1 − top-2
logit margin met while decoding greedily, so how far a float32 implementation is from a tie;
state share: |s·C| / |y| in the scan on the 13-token prompt, layers averaged, the part of y the
recurrence contributes; mean Δ likewise):

"""


def summary(report, sizes):
    lines = ["| model | logit std | min / max | greedy gap | state share | mean Δ | other |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for info in report:
        other = ["token-by-token vs whole prompt %.1e" % info["step_gap"]]
        if "ssd_gap" in info:
            other.append("chunked vs recurrent SSD %.1e" % info["ssd_gap"])
        if "clamped_fraction" in info:
            other.append("Δ clamped %.0f%%" % (100 * info["clamped_fraction"]))
        if "clamp_effect" in info:
            other.append("clamp moves logits by up to %.3f" % info["clamp_effect"])
        if "q8_0_max_logit_shift" in info:
            other.append("q8_0: %d tensors, logits move by up to %.4f, greedy gap %.3f"
                         % (info["q8_0_tensors"], info["q8_0_max_logit_shift"], info["min_greedy_gap_q8_0"]))
        lines.append("| %s | %.3f | %.2f / %.2f | %.3f | %.3f | %.4f | %s |" % (
            info["name"], info["logit_std"], info["logit_min"], info["logit_max"], info["min_greedy_gap"],
            info["state_share"], info["dt_mean"], "; ".join(other)))
    lines += ["", "Files (bytes):", "", "| file | bytes |", "| --- | --- |"]
    lines += ["| %s | %d |" % (path, size) for path, size in sizes]
    return "\n".join(lines)


def model_table():
    lines = ["| model | arch | d | layers | vocab rows (unpadded) | sizes | bias / conv bias | head | folders |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    yes = lambda flag: "yes" if flag else "no"
    for s in MODELS:
        if s["arch"] == "mamba1":
            rank = f'"auto" = {s["R"]}' if s["R_config"] == "auto" else str(s["R"])
            sizes = f'd_inner {s["di"]}, N {s["N"]}, dt_rank {rank}, K {s["K"]}'
        else:
            limit = "[%s, %s]" % tuple("inf" if math.isinf(v) else "%g" % v for v in s["limit"])
            sizes = (f'H {s["H"]}, P {s["P"]} (d_inner {s["H"] * s["P"]}), G {s["G"]}, N {s["N"]}, K {s["K"]}, '
                     f'chunk {s["Q"]}, time_step_limit {limit}')
        vocab = str(s["vocab"])
        if s["vocab_unpadded"] != s["vocab"]:
            vocab += f' ({s["vocab_unpadded"]}, pad {pad_multiple(s)})'
        folders = "hf, mamba_ssm" if s["mamba_ssm"] else "hf"
        lines.append(f'| {s["name"]} | {s["arch"]} | {s["d"]} | {s["layers"]} | {vocab} | {sizes} | '
                     f'{yes(s["bias"])} / {yes(s["conv_bias"])} | {"tied" if s["tied"] else "untied"} | {folders} |')
    return "\n".join(lines)


def build_all(staging):
    tokenizer = build_tokenizer()
    vocab_tokens = len(tokenizer["model"]["vocab"])
    for spec in MODELS:
        if spec.get("tokenizer"):
            spec["vocab_unpadded"] = vocab_tokens
            spec["vocab"] = -(-vocab_tokens // 8) * 8
    report = []
    write_atomic(os.path.join(staging, "tokenizer.json"), tokenizer_json(tokenizer))
    for spec in MODELS:
        build_model(spec, tokenizer, os.path.join(staging, spec["name"]), report)
    sizes = []
    for folder, _, files in sorted(os.walk(staging)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            assert size < MAX_FILE_BYTES, f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} allowed"
            sizes.append((os.path.relpath(path, staging), size))
    table = summary(report, sizes)
    readme = README.replace("{models}", model_table()) + table + "\n"
    write_atomic(os.path.join(staging, "README.md"), readme.encode())
    return table


def main():
    staging = OUT + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        table = build_all(staging)
    except BaseException:
        # never leave a half-written fixture folder behind; the current one is untouched
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # swap the finished folder in
    previous = OUT + ".previous"
    shutil.rmtree(previous, ignore_errors=True)
    if os.path.exists(OUT):
        os.replace(OUT, previous)
    os.replace(staging, OUT)
    shutil.rmtree(previous, ignore_errors=True)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
