"""Training throughput on CPU: llmkit's Trainer step vs a nanoGPT-architecture peer, same run, A B A B.

Config from the issue: 6 layers, 6 heads, d_model 384, block 256, vocab 8192, batch 16, GPT-2 style
(learned positions, LayerNorm, GELU, tied embeddings), fp32, 2 threads. The peer is a minimal GPT written
here the way nanoGPT's model.py is built (fused qkv Linear, SDPA causal attention, plain loop with
torch AdamW): the reference figure "nanoGPT ran 1,713 tok/s on this machine" is printed next to the
same-run ratio. llmkit is also run with bf16 autocast. MFU = model FLOP/s / the matmul peak measured now.

    .venv/bin/python bench/train_throughput.py [--rounds 3 --steps 2 --threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.model import Transformer
from llmkit.train.data import TokenBatches
from llmkit.train.losses import lm_loss
from llmkit.train.pretrain import build_config
from llmkit.train.trainer import TrainConfig, Trainer, measure_peak_flops, model_flops_per_token

NANOGPT_REFERENCE_TOK_S = 1713.0
L, H, D, T, V, B = 6, 6, 384, 256, 8192, 16


class PeerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.c_fc, self.mlp_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)  # 3 x (B, T, D)
        q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.h = nn.ModuleList(PeerBlock() for _ in range(L))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for blk in self.h:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per measurement")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shard = np.random.default_rng(0).integers(0, V, size=2_000_000).astype(np.uint16)
    mc = build_config(V, T, "small-gpt2")
    print(
        f"config: {L} layers, {H} heads, d_model {D}, block {T}, vocab {V}, batch {B}; "
        f"{args.threads} threads; torch {torch.__version__}"
    )

    def make_trainer(dtype: str) -> Trainer:
        cfg = TrainConfig(
            steps=10**6,
            batch_size=B,
            block_size=T,
            lr=6e-4,
            warmup=10,
            dtype=dtype,
            progress=False,
            device="cpu",
        )
        return Trainer(
            Transformer(mc), lm_loss, TokenBatches([shard], T, B, seed=0), cfg, "/tmp/llmkit-bench-train"
        )

    ours = {"llmkit fp32": make_trainer("float32"), "llmkit bf16": make_trainer("bfloat16")}
    peer = PeerGPT()
    opt = torch.optim.AdamW(peer.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    peer_batches = TokenBatches([shard], T, B, seed=1)

    def peer_step() -> None:
        x, y = peer_batches.next()
        loss = peer(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    runners = {name: tr.train_step for name, tr in ours.items()}
    runners["nanoGPT-arch peer fp32"] = peer_step
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):  # A B C A B C ...
        for name, fn in runners.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append(args.steps * B * T / (time.perf_counter() - t0))
    fpt = model_flops_per_token(ours["llmkit fp32"].raw_model, T)
    peak32 = measure_peak_flops(torch.device("cpu"), None)
    peak16 = measure_peak_flops(torch.device("cpu"), torch.bfloat16)
    print(
        f"model FLOPs/token {fpt / 1e6:.1f} M; measured matmul peak fp32 {peak32 / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak16 / 1e9:.1f} GFLOP/s"
    )
    med = {k: float(np.median(v)) for k, v in times.items()}
    for name, tok_s in med.items():
        peak = peak16 if "bf16" in name else peak32
        runs = ", ".join(f"{t:,.0f}" for t in times[name])
        print(
            f"{name:24s} {tok_s:8,.0f} tok/s (median of {args.rounds}; runs {runs})"
            f"  MFU {100 * fpt * tok_s / peak:5.1f}%"
        )
    peer_med = med["nanoGPT-arch peer fp32"]
    print(
        f"ratio llmkit fp32 / peer (same run): {med['llmkit fp32'] / peer_med:.2f}x; "
        f"bf16 / peer: {med['llmkit bf16'] / peer_med:.2f}x"
    )
    print(
        f"vs the recorded nanoGPT figure {NANOGPT_REFERENCE_TOK_S:,.0f} tok/s (quiet machine): "
        f"{med['llmkit fp32'] / NANOGPT_REFERENCE_TOK_S:.2f}x fp32 "
        f"(1-min load average now {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
