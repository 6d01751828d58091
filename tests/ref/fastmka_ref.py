#!/usr/bin/env python3
"""fastmka_ref.py — an independent numpy (float32) reference of shared/FASTMKA.md.

Computes the logits after the last token of a prompt for a Hugging Face model
directory (Qwen2 / Llama, config.json + safetensors, single file or sharded;
f32, f16 or bf16 storage) with FastMKA router weights (levels 2 or 3) or
without them (plain attention: lambda = [1, 0, 0], which must reproduce
Hugging Face transformers).

  fastmka_ref.py --model DIR --ids 1,2,3 [--l3-bank FILE] [--kv-dtype auto|f32|bf16]
                 --out FILE [--verbose]
      writes the last-position logits as raw little-endian float32 (vocab floats)
  fastmka_ref.py --model DIR --make-bank R [--seed S] --out-bank FILE
      writes a random L3 bank: float32 (R, n_layers, D), values uniform(-1, 1)

The L3 bank file (shared with mkad-cli --l3-bank) is a raw little-endian
float32 array of shape (R, n_layers, D): chunk r's per-layer value vectors mu;
R = filesize / (n_layers * D * 4).  Keys are kappa = mu / |mu|.

The whole computation is a single prefill over positions 0..T-1 of a fresh
session (EMA state starts at 0), in float32 throughout, with the operation
order of transformers' eager implementation where that is cheap to follow.
One deliberate rounding: the K/V cache holds what mkad's CPU backend keeps,
so with --kv-dtype bf16 (the default, auto, for a checkpoint whose
embed_tokens are bf16, as the engine decides) the fused K (after RoPE) and V
are rounded to bf16, nearest even, before attention reads them.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

F32 = np.float32


class ModelError(Exception):
    pass


# ---- config / weights ---------------------------------------------------------

def load_config(d):
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f)


def rope_params(cfg):
    """(rope_theta, scaling dict or None) from either the classic
    rope_theta/rope_scaling keys or transformers v5 rope_parameters."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta = float(rp["rope_theta"])
        t = rp.get("rope_type", rp.get("type", "default"))
        return theta, (None if t == "default" else dict(rp))
    theta = float(cfg.get("rope_theta", 10000.0))
    rs = cfg.get("rope_scaling")
    if rs:
        t = rs.get("rope_type", rs.get("type"))
        if t in (None, "default"):
            rs = None
    return theta, rs or None


def rope_inv_freq(cfg, head_dim):
    """(inv_freq (head_dim/2) float32, attention scaling) as transformers computes them."""
    base, rs = rope_params(cfg)
    dim = head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)
    if rs is None:
        return (F32(1.0) / (F32(base) ** exps)).astype(F32), 1.0
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        inv = F32(1.0) / (F32(base) ** exps)
        return (inv / F32(rs["factor"])).astype(F32), 1.0
    if kind == "llama3":
        inv = F32(1.0) / (F32(base) ** exps)
        factor = float(rs["factor"])
        lo = float(rs["low_freq_factor"])
        hi = float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        low_wl = old / lo
        high_wl = old / hi
        wavelen = F32(2 * math.pi) / inv
        inv_l = np.where(wavelen > F32(low_wl), inv / F32(factor), inv).astype(F32)
        smooth = (F32(old) / wavelen - F32(lo)) / F32(hi - lo)
        smoothed = (F32(1) - smooth) * inv_l / F32(factor) + smooth * inv_l
        medium = ~(wavelen < F32(high_wl)) & ~(wavelen > F32(low_wl))
        return np.where(medium, smoothed, inv_l).astype(F32), 1.0
    if kind == "yarn":
        factor = rs.get("factor")
        orig = rs["original_max_position_embeddings"]
        if factor is None:
            factor = cfg["max_position_embeddings"] / orig
        factor = float(factor)
        att = rs.get("attention_factor")
        mscale = rs.get("mscale")
        mscale_all = rs.get("mscale_all_dim")

        def get_mscale(scale, m=1):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if att is None:
            if mscale and mscale_all:
                att = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
            else:
                att = get_mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1

        def corr_dim(nrot):
            return (dim * math.log(orig / (nrot * 2 * math.pi))) / (2 * math.log(base))
        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = F32(base) ** (np.arange(0, dim, 2).astype(F32) / F32(dim))
        extrap = F32(1.0) / pos_freqs
        interp = F32(1.0) / (F32(factor) * pos_freqs)
        ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1).astype(F32)
        ef = F32(1) - ramp
        return (interp * (F32(1) - ef) + extrap * ef).astype(F32), float(att)
    raise ModelError("config.json: rope_scaling type %r is not supported" % kind)


class Model:
    def __init__(self, d):
        self.dir = d
        cfg = self.cfg = load_config(d)
        mt = cfg.get("model_type")
        if mt not in ("qwen2", "llama"):
            raise ModelError("config.json: model_type %r not supported" % mt)
        self.D = int(cfg["hidden_size"])
        self.H = int(cfg["num_attention_heads"])
        self.K = int(cfg.get("num_key_value_heads") or self.H)
        self.hd = int(cfg.get("head_dim") or self.D // self.H)
        self.n_layers = int(cfg["num_hidden_layers"])
        self.V = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        mka = cfg.get("mka") or {}
        self.beta = F32(mka.get("ema_beta", 0.9))
        self.inv_freq, self.att_scale = rope_inv_freq(cfg, self.hd)
        w = self.w = st.load_model_dir(d)
        self.kv_bf16 = st.tensor_dtype(d, "model.embed_tokens.weight") == "BF16"

        def get(name, required=True):
            if name in w:
                return w[name]
            if required:
                raise ModelError("%s: tensor %s missing" % (d, name))
            return None

        self.embed = get("model.embed_tokens.weight")
        self.final_norm = get("model.norm.weight")
        self.lm_head = self.embed if self.tied else get("lm_head.weight", required=False)
        if self.lm_head is None:
            self.lm_head = self.embed
        self.layers = []
        levels = set()
        for i in range(self.n_layers):
            p = "model.layers.%d." % i
            a = p + "self_attn."
            if a + "q_proj.weight" not in w and a + "original_attn.q_proj.weight" in w:
                a = a + "original_attn."
            L = {
                "in_norm": get(p + "input_layernorm.weight"),
                "post_norm": get(p + "post_attention_layernorm.weight"),
                "gate": get(p + "mlp.gate_proj.weight"),
                "up": get(p + "mlp.up_proj.weight"),
                "down": get(p + "mlp.down_proj.weight"),
            }
            for nm in ("q", "k", "v", "o"):
                L[nm] = get(a + nm + "_proj.weight")
                L[nm + "_b"] = get(a + nm + "_proj.bias", required=False)
            r = p + "self_attn.router."
            if r + "0.weight" in w:
                L["r1"], L["r1_b"] = get(r + "0.weight"), get(r + "0.bias")
                L["r2"], L["r2_b"] = get(r + "2.weight"), get(r + "2.bias")
                levels.add(L["r2"].shape[0])
            else:
                levels.add(0)
            self.layers.append(L)
        if len(levels) != 1:
            raise ModelError("%s: router present in some layers only (levels %s)" % (d, sorted(levels)))
        self.levels = levels.pop()
        if self.levels not in (0, 2, 3):
            raise ModelError("%s: router.2.weight has %d rows; expected 2 or 3" % (d, self.levels))
        cl = mka.get("levels")
        if self.levels and cl is not None and int(cl) != self.levels:
            raise ModelError("config.json: mka.levels %s but router.2.weight has %d rows" % (cl, self.levels))


# ---- the forward pass ------------------------------------------------------------

def rmsnorm(x, w, eps):
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
    return (w * (x * (F32(1.0) / np.sqrt(var + F32(eps))))).astype(F32)


def linear(x, w, b):
    y = x @ w.T
    if b is not None:
        y = y + b
    return y.astype(F32)


def silu(x):
    return (x / (F32(1.0) + np.exp(-x))).astype(F32)


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(F32)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(m, ids, bank=None, verbose=False):
    """Logits (V) after the last of `ids`, one fresh session."""
    T = len(ids)
    D, H, K, hd = m.D, m.H, m.K, m.hd
    ids = np.asarray(ids, dtype=np.int64)
    h = m.embed[ids].astype(F32)                                  # (T, D)
    pos = np.arange(T, dtype=np.int64).astype(F32)
    freqs = pos[:, None] * m.inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = (np.cos(emb) * F32(m.att_scale)).astype(F32)            # (T, hd)
    sin = (np.sin(emb) * F32(m.att_scale)).astype(F32)
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)
    scale = F32(hd ** -0.5)
    beta = m.beta
    one_m_beta = F32(1.0) - beta
    for li, L in enumerate(m.layers):
        x = rmsnorm(h, L["in_norm"], m.eps)                       # (T, D)
        q = linear(x, L["q"], L["q_b"])                           # (T, H*hd)
        if m.levels:
            z = silu(linear(q, L["r1"], L["r1_b"]))
            lam = softmax(linear(z, L["r2"], L["r2_b"]))          # (T, levels)
            s = np.zeros(D, dtype=F32)
            S = np.empty_like(x)
            for t in range(T):
                s = (beta * s + one_m_beta * x[t]).astype(F32)
                S[t] = s
            f = lam[:, 0:1] * x + lam[:, 1:2] * S
            if m.levels == 3 and bank is not None and bank.shape[0] > 0:
                mu = bank[:, li, :]                               # (R, D)
                nrm = np.sqrt(np.sum(mu * mu, axis=-1, keepdims=True, dtype=F32))
                kappa = np.where(nrm > 0, mu / np.where(nrm > 0, nrm, F32(1)), F32(0)).astype(F32)
                a = softmax((x @ kappa.T) / F32(math.sqrt(D)))   # (T, R)
                M = (a @ mu).astype(F32)
                f = f + lam[:, 2:3] * M
            f = f.astype(F32)
            if verbose:
                print("layer %d: lambda mean %s min %s max %s" % (
                    li, np.round(lam.mean(0), 3), np.round(lam.min(0), 3), np.round(lam.max(0), 3)),
                    file=sys.stderr)
        else:
            f = x
        k = linear(f, L["k"], L["k_b"])                           # (T, K*hd)
        v = linear(f, L["v"], L["v_b"])
        qh = q.reshape(T, H, hd).transpose(1, 0, 2)               # (H, T, hd)
        kh = k.reshape(T, K, hd).transpose(1, 0, 2)
        vh = v.reshape(T, K, hd).transpose(1, 0, 2)
        qh = (qh * cos + rotate_half(qh) * sin).astype(F32)
        kh = (kh * cos + rotate_half(kh) * sin).astype(F32)
        if m.kv_bf16:                                             # the K/V cache's dtype
            kh, vh = st.bf16_round(kh), st.bf16_round(vh)
        rep = H // K
        kh = np.repeat(kh, rep, axis=0)                           # head j uses kv head j // rep
        vh = np.repeat(vh, rep, axis=0)
        sc = (qh @ kh.transpose(0, 2, 1)) * scale                 # (H, T, T)
        sc = np.where(mask[None], F32(-np.inf), sc)
        p = softmax(sc)
        o = (p @ vh).transpose(1, 0, 2).reshape(T, H * hd).astype(F32)
        h = (h + linear(o, L["o"], L["o_b"])).astype(F32)
        x2 = rmsnorm(h, L["post_norm"], m.eps)
        mlp = linear(silu(linear(x2, L["gate"], None)) * linear(x2, L["up"], None), L["down"], None)
        h = (h + mlp).astype(F32)
    hl = rmsnorm(h[-1:], m.final_norm, m.eps)
    return (hl @ m.lm_head.T).astype(F32)[0]


def load_bank(path, m):
    raw = np.fromfile(path, dtype="<f4")
    per = m.n_layers * m.D
    if raw.size % per:
        raise ModelError("%s: %d floats is not a multiple of n_layers*D = %d" % (path, raw.size, per))
    return raw.reshape(-1, m.n_layers, m.D).astype(F32)


def parse_ids(s, V):
    try:
        ids = [int(t) for t in s.split(",") if t.strip() != ""]
    except ValueError:
        raise ModelError("--ids: expected comma-separated integers, got %r" % s)
    if not ids:
        raise ModelError("--ids: empty")
    bad = [i for i in ids if i < 0 or i >= V]
    if bad:
        raise ModelError("--ids: token %d outside [0, %d)" % (bad[0], V))
    return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--l3-bank", help="L3 bank file (float32 (R, n_layers, D))")
    ap.add_argument("--out", help="logits output file (raw float32 LE)")
    ap.add_argument("--make-bank", type=int, metavar="R", help="write a random L3 bank of R chunks")
    ap.add_argument("--seed", type=int, default=1, help="seed for --make-bank")
    ap.add_argument("--out-bank", help="bank output file for --make-bank")
    ap.add_argument("--kv-dtype", choices=("auto", "f32", "bf16"), default="auto",
                    help="K/V cache dtype (auto: bf16 for a bf16 checkpoint, as mkad's CPU backend)")
    ap.add_argument("--verbose", action="store_true", help="router statistics on stderr")
    a = ap.parse_args(argv)
    try:
        if a.make_bank is not None:
            if not a.out_bank:
                ap.error("--make-bank needs --out-bank")
            if a.make_bank < 0:
                ap.error("--make-bank: R must be >= 0")
            cfg = load_config(a.model)
            nl, D = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
            rng = np.random.default_rng(a.seed)
            bank = rng.uniform(-1.0, 1.0, size=(a.make_bank, nl, D)).astype("<f4")
            bank.tofile(a.out_bank)
            return 0
        if not a.ids or not a.out:
            ap.error("--ids and --out are required (or --make-bank)")
        m = Model(a.model)
        if a.kv_dtype != "auto":
            m.kv_bf16 = a.kv_dtype == "bf16"
        ids = parse_ids(a.ids, m.V)
        bank = None
        if a.l3_bank:
            if m.levels != 3:
                raise ModelError("--l3-bank: the model has mka levels %d, not 3" % m.levels)
            bank = load_bank(a.l3_bank, m)
        logits = forward(m, ids, bank, verbose=a.verbose)
        logits.astype("<f4").tofile(a.out)
        return 0
    except (ModelError, OSError, KeyError, ValueError) as e:
        print("fastmka_ref.py: error: %s" % e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
