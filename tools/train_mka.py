#!/usr/bin/env python3
"""train_mka.py — train a small FastMKA model (shared/FASTMKA.md) with PyTorch
and write it as a Hugging Face directory that mkad serves.

The model is written from FASTMKA.md, independently of the C engine: RMSNorm,
q projection (Qwen2 q/k/v bias), router lambda = softmax(W2 silu(W1 q + b1) + b2),
the L2 session summary s_t = beta s_{t-1} + (1 - beta) x_t from s_{-1} = 0
(computed for a whole training window as one matrix product with the decay
matrix), fused K/V from f = lam0 x + lam1 s (+ lam2 m; m = 0 in training, no
L3 bank), RoPE, causal GQA attention, SwiGLU, tied embeddings.

    train_mka.py --tokens austen.u16 --init models/mkad-tiny --out DIR [--steps N]

--tokens: uint16 token ids (the corpus, tokenized with the model's
tokenizer.json); --init: a directory whose config.json gives the shape (its
weights are not read). Writes DIR/model.safetensors (bf16), DIR/config.json,
copies tokenizer files, and DIR/train_log.json. With --ref-ids it also writes
the float32 logits of the trained (bf16-rounded) weights after the last of
those ids, as a parity fixture for the C engine.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ref"))
import st  # noqa: E402  (our numpy safetensors writer)


class MKA(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        D, H, K = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = D // H
        F_ = c["intermediate_size"]
        V = c["vocab_size"]
        self.L = c["mka"]["levels"]
        self.beta = c["mka"]["ema_beta"]
        self.eps = c["rms_norm_eps"]
        lin = lambda i, o, b: torch.nn.Linear(i, o, bias=b)
        self.embed = torch.nn.Embedding(V, D)
        self.layers = torch.nn.ModuleList()
        for _ in range(c["num_hidden_layers"]):
            m = torch.nn.Module()
            m.ln1 = torch.nn.Parameter(torch.ones(D))
            m.q = lin(D, H * self.hd, True)
            m.k = lin(D, K * self.hd, True)
            m.v = lin(D, K * self.hd, True)
            m.o = lin(H * self.hd, D, False)
            m.r1 = lin(H * self.hd, D // 2, True)
            m.r2 = lin(D // 2, self.L, True)
            m.ln2 = torch.nn.Parameter(torch.ones(D))
            m.gate = lin(D, F_, False)
            m.up = lin(D, F_, False)
            m.down = lin(F_, D, False)
            self.layers.append(m)
        self.norm = torch.nn.Parameter(torch.ones(D))
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, self.hd, 2, dtype=torch.int64).float() / self.hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
        for m in self.layers:
            torch.nn.init.normal_(m.o.weight, std=0.02 / math.sqrt(2 * len(self.layers)))
            torch.nn.init.normal_(m.down.weight, std=0.02 / math.sqrt(2 * len(self.layers)))

    def rms(self, x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, ids):
        B, T = ids.shape
        H, K, hd = self.c["num_attention_heads"], self.c["num_key_value_heads"], self.hd
        h = self.embed(ids).float()
        pos = torch.arange(T, device=ids.device).float()
        ang = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos(), emb.sin()
        # EMA as one product: s_t = (1-b) sum_{i<=t} b^(t-i) x_i.
        t = torch.arange(T, device=ids.device)
        expo = (t[:, None] - t[None, :]).clamp(min=0).float()
        decay = (1 - self.beta) * self.beta ** expo * (t[:, None] >= t[None, :]).float()

        def rope(x):
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        for m in self.layers:
            x = self.rms(h, m.ln1)
            q = m.q(x)
            lam = torch.softmax(m.r2(F.silu(m.r1(q))).float(), -1)
            s = torch.einsum("ts,bsd->btd", decay, x)
            f = lam[..., 0:1] * x + lam[..., 1:2] * s  # m = 0: no L3 bank in training
            k, v = m.k(f), m.v(f)
            q = rope(q.view(B, T, H, hd).transpose(1, 2))
            k = rope(k.view(B, T, K, hd).transpose(1, 2))
            v = v.view(B, T, K, hd).transpose(1, 2)
            k = k.repeat_interleave(H // K, 1)
            v = v.repeat_interleave(H // K, 1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + m.o(o.transpose(1, 2).reshape(B, T, H * hd))
            x = self.rms(h, m.ln2)
            h = h + m.down(F.silu(m.gate(x)) * m.up(x))
        return self.rms(h, self.norm) @ self.embed.weight.float().t()

    def hf_tensors(self):
        """name -> float32 numpy array, in the checkpoint layout FASTMKA.md names."""
        out = {"model.embed_tokens.weight": self.embed.weight, "model.norm.weight": self.norm}
        for i, m in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = m.ln1
            out[p + "post_attention_layernorm.weight"] = m.ln2
            for n in ("q", "k", "v"):
                out[p + f"self_attn.{n}_proj.weight"] = getattr(m, n).weight
                out[p + f"self_attn.{n}_proj.bias"] = getattr(m, n).bias
            out[p + "self_attn.o_proj.weight"] = m.o.weight
            out[p + "self_attn.router.0.weight"] = m.r1.weight
            out[p + "self_attn.router.0.bias"] = m.r1.bias
            out[p + "self_attn.router.2.weight"] = m.r2.weight
            out[p + "self_attn.router.2.bias"] = m.r2.bias
            for n in ("gate", "up", "down"):
                out[p + f"mlp.{n}_proj.weight"] = getattr(m, n).weight
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--init", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ref-ids", default="")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = json.load(open(os.path.join(a.init, "config.json")))
    data = torch.from_numpy(np.fromfile(a.tokens, dtype=np.uint16).astype(np.int64))
    n_val = len(data) // 50
    train, val = data[:-n_val], data[-n_val:]
    model = MKA(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(a.seed)

    def batch(src):
        ix = torch.randint(len(src) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([src[i: i + a.seq] for i in ix])
        y = torch.stack([src[i + 1: i + a.seq + 1] for i in ix])
        return x.to(dev), y.to(dev)

    def loss_of(x, y):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    log, t0, best = [], time.time(), (float("inf"), -1, None)
    warm = max(1, min(200, a.steps // 10))
    for step in range(a.steps + 1):
        lr = a.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        if step % 100 == 0 or step == a.steps:
            model.eval()
            with torch.no_grad():
                vl = sum(loss_of(*batch(val)).item() for _ in range(8)) / 8
            model.train()
            log.append({"step": step, "val_loss": round(vl, 4), "s": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
            if vl < best[0]:  # 1 M tokens overfit quickly: keep the best held-out loss
                best = (vl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if step == a.steps:
            break
        x, y = batch(train)
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.load_state_dict(best[2])
    print(json.dumps({"kept_step": best[1], "val_loss": round(best[0], 4)}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    tensors = model.hf_tensors()
    st.save(os.path.join(a.out, "model.safetensors"), tensors, dtype="BF16")
    cfg["torch_dtype"] = "bfloat16"
    cfg.pop("mkad_genmodel", None)
    cfg["mkad_train"] = {"script": "tools/train_mka.py", "steps": a.steps, "batch": a.batch, "seq": a.seq,
                         "lr": a.lr, "seed": a.seed, "kept_step": best[1], "val_loss": round(best[0], 4),
                         "corpus": "Jane Austen's six novels (r-cran-janeaustenr), 2% held out"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(a.init, name)):
            shutil.copy(os.path.join(a.init, name), os.path.join(a.out, name))
    with open(os.path.join(a.out, "train_log.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                   "torch": torch.__version__, "log": log}, f, indent=1)

    if a.ref_ids:
        # Logits of the weights as written (bf16-rounded), computed in float32.
        ids = torch.tensor([[int(t) for t in a.ref_ids.split(",")]], device=dev)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(p.to(torch.bfloat16).float())
            model.float()
            out = model(ids)[0, -1].float().cpu().numpy()
        out.astype("<f4").tofile(os.path.join(a.out, "ref.logits"))


if __name__ == "__main__":
    main()
