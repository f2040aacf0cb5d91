"""One training loop for every stage (pretraining now; SFT, LoRA, DPO, GRPO reuse it with their own loss).

`Trainer(model, loss_fn, batches, cfg, run_dir)` runs AdamW over the parameters that require grad
(weight decay on Linear matrices only, not on biases, norms or embeddings), linear warmup + cosine decay
to `min_lr`, gradient accumulation, clipping, bf16 autocast (CUDA default, CPU optional), optional
torch.compile, and under torchrun DistributedDataParallel or FSDP2 (`cfg.parallel`). `loss_fn(model,
batch) -> (sum of losses, items)` is all a stage supplies (llmkit.train.losses); `batches` is any object
with `next(device)`, `state_dict()` and
`load_state_dict()`; `evaluate(model, final) -> dict` is an optional hook called every `eval_every` steps
and at the end. An optional frozen `ref_model` (eval mode, no grad, never optimized or saved) is passed
to the loss as `loss_fn(model, batch, ref_model=ref)` for DPO and KL penalties.

Notable choices
- The loss of a step is (sum of every micro-batch's loss sum, on every rank) / (their item count, all-
  reduced): masked micro-batches weigh by their trained tokens, not 1/grad_accum each. The count is known
  only after the forwards, so each micro-batch backpropagates total / S with S the nominal tokens per step
  (batch_size * grad_accum * block_size, the same on every rank), and the gradients are rescaled by S / N
  once the step's count N is all-reduced. Pretraining trains every token, so N == S and the rescale is an
  exact x1; no host sync is added (the rescale is a device-side multiply).
- Exact resume: a checkpoint holds model, optimizer, scheduler, the torch/numpy/python (and CUDA) RNG
  states, the data position and both configs; resuming reproduces the uninterrupted run bit for bit on
  CPU with the same seed and thread count (tested). Metrics past the checkpoint step are dropped.
- When some parameters are frozen (requires_grad False: LoRA, a frozen base), the checkpoint holds only
  the trainable ones (buffers belong to the base); resume loads them onto a freshly built base and
  insists that the same names train. When everything trains, the checkpoint holds the full state_dict.
- Checkpoints, the trimmed metrics and the loss curve are written atomically (`llmkit.io`: a temporary
  file renamed over the old one), so a crash or a full disk leaves the previous file intact; only rank 0
  writes anything.
- MFU = achieved model FLOP/s / the machine's matmul peak, measured once at start with a short matmul
  benchmark in the training dtype (not a datasheet number). Model FLOPs per token = 6 * (weights of
  every Linear, lm_head included) + 12 * layers * attention width * block (PaLM appendix B).
- Evaluation and sampling never touch the global RNG (samples use their own seeded generator), so
  periodic evals do not change the training trajectory.

Distributed (`torchrun --nproc-per-node N -m llmkit sft ...`)
- `init_distributed(cfg)` joins the torchrun process group (gloo on CPU, NCCL on CUDA with GPU LOCAL_RANK
  made current); stages call it first, and the Trainer calls it again (a no-op once joined). Every batch
  source draws the GLOBAL batch (`batch_size` rows) and keeps its rows `idx[rank::world]`, so N processes
  train on exactly the rows of one process; only rank 0 prints or writes.
- `cfg.parallel`: "ddp" (DistributedDataParallel), "fsdp" (FSDP2: `fully_shard` on every transformer block,
  then on the root; parameters, gradients and AdamW states are DTensor shards), "auto" = ddp when the world
  has more than one process. Frozen and trainable parameters may share a block (LoRA): FSDP2 all-gathers
  both and reduce-scatters only the gradients that exist. bf16 comes from autocast in both modes (fp32
  master weights, the same numerics as DDP); no MixedPrecisionPolicy.
- Both DDP and FSDP2 average gradients over ranks, so a micro-batch backpropagates total * W / S and the
  rescale by S / N after the all-reduced count makes the step's gradient d(sum over all ranks)/N exactly,
  as in one process. Under FSDP the rescale runs on the local shards; clip_grad_norm_ reduces the DTensor
  shard norms to the global norm.
- One checkpoint format for every mode: the single file of a 1-process run (full tensors under the module's
  parameter names, optimizer state keyed by parameter index). Under FSDP every rank gathers each tensor
  (`DTensor.full_tensor`, one tensor at a time, copied to CPU) and rank 0 writes; on resume each rank
  keeps its own shard of the full tensors (`distribute_tensor(src_data_rank=None)`: no communication).
  So a run resumes in any mode and world size (1 -> 2 processes, DDP -> FSDP, ...).
- Evaluation, sampling and exports see the whole model: `gathered(model)` (`trainer.gathered()`; every
  rank enters it) all-gathers every FSDP shard once and keeps the weights whole until the block ends (no
  collective in its forwards), so rank-dependent work (samples on rank 0, rank-strided evals, rollouts of
  different lengths) runs as under DDP. The evaluate hook always runs inside it. Inside, read parameters
  (named_parameters, module attributes), not `state_dict()` (FSDP2 answers with shards).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, atomic_torch_save, atomic_write_text
from llmkit.train.losses import LossSum, unwrap

PARALLEL = ("auto", "ddp", "fsdp")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "loss.png"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per micro-step, summed over all processes
    grad_accum: int = 1  # micro-steps per optimizer step
    block_size: int = 256
    lr: float = 1e-3
    min_lr: float | None = None  # None = lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # 0 = no clipping
    eval_every: int = 200  # 0 = only at the end
    eval_tokens: int | None = 1 << 17  # cap on val tokens of periodic evals (the final eval uses all)
    save_every: int = 0  # 0 = only at the end
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | float32 | bfloat16
    compile: bool = False
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    parallel: str = "auto"  # with torchrun: auto (= ddp when world > 1) | ddp | fsdp (FSDP2 fully_shard)
    time_budget: float | None = None  # seconds: stop then, and run the LR schedule over time instead of steps
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific settings, saved with the checkpoint

    def lr_at(self, step: int, time_frac: float | None = None) -> float:
        """Linear warmup over `warmup` steps, then cosine from lr to min_lr at `steps` (or, with a time
        budget, at the end of the budget: `time_frac` = elapsed / budget)."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = time_frac if time_frac is not None else (step - self.warmup) / max(1, self.steps - self.warmup)
        t = min(1.0, t)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * t)) * (self.lr - min_lr)


# ---------------------------------------------------------------------------------------------- helpers
def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32 ("auto": bf16 on CUDA, fp32 elsewhere)."""
    dt = resolve_dtype(cfg.dtype, device)
    return None if dt == torch.float32 else dt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay Linear matrices; no decay for biases, norms and embeddings (shared tensors counted once)."""
    decay, no_decay, seen = [], [], set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if isinstance(mod, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def frozen_reference(ref: nn.Module | None, model: nn.Module, device: torch.device) -> nn.Module | None:
    """The reference model on `device`, in eval mode with every parameter frozen (or None)."""
    if ref is None:
        return None
    own = {id(p) for p in model.parameters()}
    if any(id(p) in own for p in ref.parameters()):
        raise LlmkitError("ref_model shares parameters with the trained model; pass a copy (copy.deepcopy)")
    return ref.to(device).eval().requires_grad_(False)


def name_list(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def model_flops_per_token(model: nn.Module, block_size: int) -> float:
    m = unwrap(model)
    cfg = getattr(m, "config", None)
    n_linear = 0.0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            share = 1.0
            if cfg is not None and ".experts." in f".{name}.":  # only top-k of the experts run per token
                share = cfg.n_experts_per_tok / cfg.n_experts
            n_linear += share * mod.weight.numel()
    if cfg is None:
        return 6.0 * n_linear
    if not isinstance(getattr(m, "lm_head", None), nn.Linear):
        n_linear += cfg.vocab_size * cfg.d_model  # tied head as a functional matmul
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * block_size
    return 6.0 * n_linear + attn


_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None, seconds: float = 0.3) -> float:
    """Matmul FLOP/s this machine reaches now in the training dtype (a quick benchmark, cached)."""
    key = (str(device), str(dtype))
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    n = 4096 if device.type == "cuda" else 512
    dt = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    _PEAK_CACHE[key] = best
    return best


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, state, gauss = st["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_jsonl_line(line: str) -> dict[str, Any] | None:
    """One record of a JSONL log, or None for a blank line or one torn by a kill mid-write."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def save_checkpoint(obj: Any, path: Path) -> None:
    """`torch.save` atomically; a failed write is a one-line LlmkitError and keeps the old file."""
    try:
        atomic_torch_save(obj, path)
    except OSError as e:
        raise LlmkitError(
            f"{path}: could not write the checkpoint ({e.strerror or e}); the previous checkpoint is kept"
        ) from None


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise LlmkitError(
            f"--out {run_dir}: not writable ({e.strerror or e}); choose another folder"
        ) from None


def distributed() -> tuple[int, int]:
    """(rank, world_size) of the process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(cfg: TrainConfig | None = None, timeout: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): gloo on CPU, NCCL on
    CUDA with GPU LOCAL_RANK made current (and `cfg.device` set to it). Returns (rank, world_size); outside
    torchrun, or once joined, it only returns them. `timeout`: seconds a collective may wait (torch's
    default otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return distributed()
    device = resolve_device(cfg.device if cfg is not None else "auto")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        if cfg is not None:
            cfg.device = str(device)
    if not dist.is_initialized():
        import datetime

        wait = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **wait)  # bound to this GPU (barriers too)
        elif dist.is_gloo_available():
            dist.init_process_group("gloo", **wait)
        else:
            raise LlmkitError("torchrun on CPU needs the gloo backend, which this torch build lacks")
    return distributed()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every rank (a new tensor on t's device; with NCCL the sum runs on this rank's GPU),
    or `t` itself in one process. Every rank must call it: for statistics a stage keeps per rank."""
    if distributed()[1] == 1:
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(dev, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def resolve_parallel(parallel: str, world: int) -> str:
    """cfg.parallel -> "none" (one process), "ddp" or "fsdp"."""
    if parallel not in PARALLEL:
        raise LlmkitError(f"--parallel {parallel!r}: choose one of {', '.join(PARALLEL)}")
    if world <= 1:
        return "none"
    return "ddp" if parallel == "auto" else parallel


def shard_model(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2: `fully_shard` every transformer block (llmkit Blocks, else the entries of `layers` lists),
    then the root (embeddings, final norm, head and whatever else is left), in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from llmkit.model.transformer import Block

    mesh = init_device_mesh(device.type, (world,))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        blocks = [b for n, m in model.named_modules() if n.rpartition(".")[2] in ("layers", "h")
                  and isinstance(m, nn.ModuleList) for b in m]
    for b in blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (an FSDP2 shard), without importing torch.distributed.tensor (seconds)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with whole weights on every rank for the block. Under FSDP2 (an FSDP root) every rank must
    enter it: each FSDP module is all-gathered once and kept whole (its forwards then communicate nothing,
    so ranks may run different work: samples on rank 0, rollouts of different lengths), and resharded at
    the end. Read parameters inside (named_parameters, attributes), not `state_dict()` (FSDP2 answers with
    shards). Any other module, or one already gathered (nested blocks), is yielded as is."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(model, fsdp.FSDPModule) or id(model) in _GATHERED:
        yield model
        return
    mods = [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    _GATHERED.add(id(model))
    try:
        yield model
    finally:
        _GATHERED.discard(id(model))
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # fully_shard's default


_GATHERED: set[int] = set()  # ids of FSDP roots inside `gathered`


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (a DTensor is all-gathered: every rank must call this)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this rank's shard when `like` is a DTensor (no communication)."""
    if is_dtensor(like) and full.shape == like.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor],
        batches: Any,
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        evaluate: Callable[[nn.Module, bool], dict[str, Any]] | None = None,
        model_config: Any = None,
        ref_model: nn.Module | None = None,
    ):
        self.cfg, self.loss_fn, self.batches, self.evaluate = cfg, loss_fn, batches, evaluate
        self.run_dir = Path(run_dir)
        self.rank, self.world = init_distributed(cfg)  # a no-op unless torchrun started this process
        self.parallel = resolve_parallel(cfg.parallel, self.world)  # none | ddp | fsdp
        self.is_main = self.rank == 0
        if cfg.batch_size < self.world:
            raise LlmkitError(f"--batch-size {cfg.batch_size} is global: it must be at least the number of "
                              f"processes ({self.world})")
        self.device = resolve_device(cfg.device)
        self.amp = autocast_dtype(cfg, self.device)
        self.model_config = model_config
        if self.is_main:
            check_writable(self.run_dir)
        self.raw_model = model.to(self.device)
        self.ref_model = frozen_reference(ref_model, self.raw_model, self.device)
        named = list(self.raw_model.named_parameters())  # a tied tensor once, under its first name
        self.trainable = [n for n, p in named if p.requires_grad]
        self.frozen = len(self.trainable) < len(named)  # checkpoints then hold only the trainable ones
        if not self.trainable:
            raise LlmkitError("nothing to train: every parameter has requires_grad=False")
        self.flops_per_token = model_flops_per_token(self.raw_model, cfg.block_size)
        if self.parallel == "fsdp":  # before the optimizer: fully_shard replaces the parameters by DTensors
            shard_model(self.raw_model, self.device, self.world)
        groups = param_groups(self.raw_model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.step_tokens = cfg.batch_size * cfg.grad_accum * cfg.block_size  # nominal, all ranks
        self.opt = torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=cfg.betas,
            fused=self.device.type == "cuda",
        )
        self.time_frac: float | None = 0.0 if cfg.time_budget else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: cfg.lr_at(s, self.time_frac) / cfg.lr
        )
        self.model: nn.Module = self.raw_model  # under FSDP the root itself (fully_shard works in place)
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(
                self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self.peak_flops: float | None = None
        self.finished = False
        self.t_start = time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (full tensors on CPU; under FSDP a collective: every rank must call it)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": self.model_state(),
            "trainable_only": self.frozen,
            "optimizer": self.optimizer_state(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "train_config": asdict(self.cfg),
            "model_config": self.model_config.to_dict() if hasattr(self.model_config, "to_dict") else None,
        }

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full state_dict, or only the trainable parameters when some are frozen (whole tensors)."""
        if not self.frozen:
            sd = self.raw_model.state_dict()
        else:
            params = dict(self.raw_model.named_parameters())
            sd = {n: params[n] for n in self.trainable}
        if self.parallel != "fsdp":
            return {n: t.detach() for n, t in sd.items()}
        return {n: full_tensor(t) for n, t in sd.items()}

    def optimizer_state(self) -> dict[str, Any]:
        """`opt.state_dict()` with whole tensors (the FSDP shards of each AdamW state all-gathered)."""
        sd = self.opt.state_dict()
        if self.parallel == "fsdp":
            sd["state"] = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                           for i, st in sorted(sd["state"].items())}
        return sd

    def load_model_state(self, ck: dict[str, Any]) -> None:
        """Load a checkpoint's weights; a trainable-only one must name exactly this model's trainable set."""
        if not ck.get("trainable_only"):
            if self.frozen:
                raise LlmkitError(
                    "--resume: the checkpoint trained every parameter but this model freezes some; "
                    "freeze the same parameters as the saved run"
                )
            self.raw_model.load_state_dict(self._shard_state(ck["model"]))
            return
        missing = [n for n in self.trainable if n not in ck["model"]]
        extra = [n for n in ck["model"] if n not in set(self.trainable)]
        if missing or extra:
            raise LlmkitError(
                f"--resume: the checkpoint's trainable parameters differ from this model's (missing: "
                f"{name_list(missing)}; unexpected: {name_list(extra)}); freeze the same parameters"
            )
        try:
            self.raw_model.load_state_dict(self._shard_state(ck["model"]), strict=False)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise LlmkitError(f"--resume: the checkpoint does not fit this model ({first})") from None

    def _shard_state(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors -> this rank's shards of the FSDP parameters they load into (others unchanged)."""
        if self.parallel != "fsdp":
            return sd
        mine = self.raw_model.state_dict()
        return {n: shard_like(t, mine[n]) if n in mine else t for n, t in sd.items()}

    def load_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Load an `optimizer_state()`: states sharded like their parameters under FSDP; this optimizer keeps
        its own implementation flags (fused / foreach), whatever the saving run used."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        sd = {**sd, "state": {int(i): {k: shard_like(v, params[int(i)]) if isinstance(v, torch.Tensor) else v
                                       for k, v in st.items()} for i, st in sd["state"].items()},
              "param_groups": [{**saved, **{k: g[k] for k in ("fused", "foreach", "capturable") if k in g}}
                               for saved, g in zip(sd["param_groups"], self.opt.param_groups)]}
        self.opt.load_state_dict(sd)

    def save(self) -> None:
        """Write the checkpoint from rank 0 (under FSDP every rank takes part in gathering it)."""
        if self.is_main or self.parallel == "fsdp":
            state = self.state_dict()
            if self.is_main:
                save_checkpoint(state, self.run_dir / CHECKPOINT)

    def resume(self) -> None:
        """Load run_dir/checkpoint.pt and continue exactly where it stopped (every rank reads the file)."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise LlmkitError(f"--resume: no {CHECKPOINT} in {self.run_dir}; start without --resume")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LlmkitError(
                f"{path}: unreadable checkpoint ({type(e).__name__}); start a new run"
            ) from None
        mine = self.model_config.to_dict() if hasattr(self.model_config, "to_dict") else None
        if mine is not None and ck.get("model_config") not in (None, mine):
            diff = sorted(k for k in mine if ck["model_config"].get(k) != mine[k])
            raise LlmkitError(
                f"--resume: the checkpoint's model differs in {', '.join(diff)}; use the same settings"
            )
        self.load_model_state(ck)
        self.load_optimizer_state(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.batches.load_state_dict(ck["data"])
        set_rng_state(ck["rng"])
        self.step, self.tokens_seen = int(ck["step"]), int(ck["tokens_seen"])
        if self.is_main:
            self._truncate_metrics()

    def gathered(self) -> contextlib.AbstractContextManager[nn.Module]:
        """`gathered(self.raw_model)`: the trained module with whole weights for the block (evaluation,
        samples, exports); under FSDP every rank must enter it."""
        return gathered(self.raw_model)

    def _truncate_metrics(self) -> None:
        path = self.run_dir / METRICS
        if not path.exists():
            return
        keep = [r for r in map(parse_jsonl_line, path.read_text().splitlines())
                if r is not None and r.get("step", 0) <= self.step]
        self.history = keep
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.history.append(record)
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        if not self.is_main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        tr = [(r["step"], r["loss"]) for r in self.history if "loss" in r]
        va = [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if tr:
            ax.plot(*zip(*tr), label="train loss", lw=1)
        if va:
            ax.plot(*zip(*va), "o-", label="val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        try:
            with atomic_path(self.run_dir / CURVE) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)

    # ------------------------------------------------------------------ loop
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def accumulate(self) -> torch.Tensor:
        """Forwards and backwards over grad_accum micro-batches, leaving in `.grad` the gradient of the
        step's loss (summed over micro-batches and ranks) / its item count (summed likewise).
        Returns the float64 tensor (loss sum, count) of the step, over every rank."""
        cfg, model = self.cfg, self.model
        model.train()
        extra = {} if self.ref_model is None else {"ref_model": self.ref_model}
        scale = self.world / self.step_tokens  # DDP and FSDP average over ranks: the gradient of sum / S
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, count)
        for micro in range(cfg.grad_accum):
            batch = self.batches.next(self.device)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            ctx = model.no_sync() if self.parallel == "ddp" and not sync else contextlib.nullcontext()
            if self.parallel == "fsdp":
                model.set_requires_gradient_sync(sync)  # reduce-scatter once, after the last micro-batch
            with ctx:
                with self.autocast():
                    total, count = LossSum(*self.loss_fn(model, batch, **extra))
                (total * scale).backward()
            count = torch.as_tensor(count, device=self.device)
            stats += torch.stack([total.detach().double(), count.double()])
        if self.world > 1:
            dist.all_reduce(stats)
        grads = [p.grad.to_local() if is_dtensor(p.grad) else p.grad  # FSDP: this rank's shard
                 for p in self.params if p.grad is not None]
        if grads:  # sum / S -> sum / N (x1 exactly when every nominal token trained)
            torch._foreach_mul_(grads, (self.step_tokens / stats[1].clamp(min=1)).float())
        return stats

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss per item, grad norm)."""
        stats = self.accumulate()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip if self.cfg.clip > 0 else math.inf)
        if is_dtensor(gnorm):  # FSDP: the norm of the whole gradient, replicated
            gnorm = gnorm.full_tensor()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(stats[0] / stats[1].clamp(min=1)), float(gnorm)

    def run_eval(self, final: bool) -> dict[str, Any]:
        if self.evaluate is None:
            return {}
        with self.gathered() as model, self.autocast():
            out = self.evaluate(model, final)
        self.raw_model.train()
        if out:
            elapsed = round(time.perf_counter() - self.t_start, 3)
            self.log({"step": self.step, "tokens": self.tokens_seen, "time": elapsed, **out})
            self.plot()
        return out

    def fit(self, stop_after: int | None = None) -> list[dict[str, Any]]:
        """Train until cfg.steps (or `stop_after` steps, to simulate an interruption); returns the metrics."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(self.device, self.amp)
        tokens_per_step = self.step_tokens
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=None if (cfg.progress and self.is_main) else True,
            unit="step",
            dynamic_ncols=True,
        )
        t_start = t_last = self.t_start = time.perf_counter()
        ema = None
        out_of_time = False
        try:
            while self.step < cfg.steps:
                if stop_after is not None and self.step >= stop_after:
                    break
                if cfg.time_budget:
                    self.time_frac = (time.perf_counter() - t_start) / cfg.time_budget
                    out_of_time = self.time_frac >= 1.0
                    if self.world > 1:  # every rank stops at the same step
                        flag = torch.tensor(float(out_of_time), device=self.device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        out_of_time = bool(flag)
                    if out_of_time:
                        break
                lr = self.sched.get_last_lr()[0]
                loss, gnorm = self.train_step()
                if not math.isfinite(loss):
                    raise LlmkitError(f"step {self.step}: loss is {loss}; lower --lr or check the data")
                self.step += 1
                self.tokens_seen += tokens_per_step
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                tok_s = tokens_per_step / dt
                ema = tok_s if ema is None else 0.9 * ema + 0.1 * tok_s
                mfu = self.flops_per_token * ema / self.world / self.peak_flops
                self.log(
                    {
                        "step": self.step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": gnorm,
                        "tokens": self.tokens_seen,
                        "tok_s": round(tok_s, 1),
                        "mfu": round(mfu, 4),
                        "time": round(now - t_start, 3),
                    }
                )
                bar.set_postfix(
                    loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{ema:,.0f}", mfu=f"{100 * mfu:.1f}%"
                )
                bar.update(1)
                last = self.step == cfg.steps
                if cfg.time_budget:
                    self.time_frac = (time.perf_counter() - t_start) / cfg.time_budget
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    ev = self.run_eval(final=False)
                    if ev and self.is_main:
                        bar.write(format_eval(self.step, ev))
                    t_last = time.perf_counter()  # eval time is not training throughput
                if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                    self.save()
            self.finished = self.step >= cfg.steps or out_of_time
            if self.finished:
                ev = self.run_eval(final=True)
                if ev and self.is_main:
                    bar.write(format_eval(self.step, ev))
                self.save()
                self.plot()
        finally:
            bar.close()
        return self.history


def format_eval(step: int, ev: dict[str, Any]) -> str:
    parts = [f"step {step}"] + [f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float)]
    line = " | ".join(parts)
    if "sample" in ev:
        line += "\n  sample: " + repr(ev["sample"])[:300]
    return line
