"""Speed of llmkit's engine on this machine: decode and prefill tokens per second, and the memory roofline.

    llmkit bench decode [MODEL] [--modes fp32,int8,int4,auto,auto+torch,auto+compile] [--text FILE]   (`run`)
    python bench/decode.py      the same run with peers (llama.cpp, HF transformers) added: bench/ holds those

Notable choices:
- The machine's memory bandwidth is measured first and after every round (a large tensor copy, bytes read +
  written); the best of those readings is the roofline (a shared VM's varies by ~1.3x within minutes, and the
  best is the strictest denominator), and every decode figure is also shown as a % of it: bandwidth / bytes
  of weights read per token.
- Systems (llmkit's variants, and any peers a caller adds) alternate round by round (A B C A B C) so a noisy,
  shared machine hits them alike; each figure is the best round, and ratios compare figures of one run.
- Only the engine's public API is timed: a request is added, steps run until its first token (the
  prefill, chunked or not) and then on to `max_tokens` (the decode). A prefill round rotates its prompt until
  the engine reports no cached tokens, so the prefix cache never shortens a measured prefill.
- Perplexity (only when a text is given: no path is assumed) comes from the one scorer,
  `llmkit.score.perplexity`, over disjoint windows of the text's first tokens.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmkit.errors import LlmkitError

PROMPT = "Il était une fois, dans un petit village de Bretagne,"


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s, counting bytes read and written (best of `repeats`)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matmul's weights (quantized: what the kernel reads),
    norms, and one row of the embedding table; a tensor shared by two modules counts once."""
    from llmkit.quant import QuantLinear

    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.kernel_bytes()
            continue
        for p in mod.parameters(recurse=False):
            if isinstance(mod, nn.Embedding):
                total += p[0].numel() * p.element_size()  # a lookup reads one row
            elif p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


@dataclass
class System:
    name: str
    decode: Callable[[], float]  # -> tok/s
    prefill: Callable[[], float] | None = None  # -> tok/s
    bytes_per_token: int = 0
    perplexity: Callable[[list[int]], float] | None = None  # token ids -> perplexity
    ref: str | None = None  # a peer: the label of its "x <ref>" ratio column
    split: Callable[[], dict[str, float]] | None = None  # -> ms per token in matmuls / head (llmkit's)
    results: dict[str, list[float]] = field(default_factory=lambda: {"decode": [], "prefill": []})


def _first_token(eng, row: int) -> None:
    """Step until `row` has produced its first token (its prefill may take several chunked steps)."""
    while not any(o.row == row for o in eng.step()):
        pass


def time_decode(eng, prompt_ids: Sequence[int], params, warmup_tokens: int = 2) -> float:
    """tok/s of the tokens after the first of one decode of `params.max_tokens` tokens (alone in the engine),
    after a short warm-up run (which also compiles a compiled engine)."""
    for p in (params.replace(max_tokens=warmup_tokens), params):
        row = eng.add(prompt_ids, p)
        _first_token(eng, row)
        t, n = time.perf_counter(), 0
        while eng.running:
            n += len(eng.step())
        dt = time.perf_counter() - t
        eng.remove(row)
    return n / dt


def time_batch_decode(model: nn.Module, prompt_ids: Sequence[int], n_new: int, batch: int,
                      compile: bool = False, native: bool = True) -> float:
    """Aggregate decode tok/s of `batch` greedy requests running together (after each has its first token),
    best of two runs (the first also warms up, or compiles, the engine)."""
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    eng = Engine(model, max_batch=batch, max_seq_len=len(prompt_ids) + n_new + 8, compile=compile,
                 native=native and not compile)
    best = 0.0
    for _ in range(2):
        rows = [eng.add(prompt_ids, params) for _ in range(batch)]
        started: set[int] = set()
        while len(started) < batch:
            started |= {o.row for o in eng.step()}
        t, n = time.perf_counter(), 0
        while eng.running:
            n += len(eng.step())
        best = max(best, n / (time.perf_counter() - t))
        for r in rows:
            eng.remove(r)
    return best


def time_prefill(eng, ids: Sequence[int], params) -> float:
    """Prompt tok/s of a prefill of `ids` (rotated until nothing of it is cached) up to its first token."""
    ids = list(ids)
    for shift in range(len(ids)):
        row = eng.add(ids[shift:] + ids[:shift], params.replace(max_tokens=1))
        if eng.request(row).cached_tokens == 0:
            break
        eng.remove(row)
    else:
        raise LlmkitError("every rotation of the prefill prompt is cached; use a prompt with varied tokens")
    t = time.perf_counter()
    _first_token(eng, row)
    dt = time.perf_counter() - t
    eng.remove(row)
    return len(ids) / dt


def engine_system(
    name: str, model: nn.Module, prompt_ids: list[int], long_ids: list[int], n_new: int,
    compile: bool = False, native: bool = True,
) -> System:
    """llmkit's engine on `model`: greedy decode of n_new tokens after prompt_ids, prefill of long_ids
    (compile: decode steps through torch.compile, compiled during the first, untimed, warm-up decode;
    native: decode steps in C when llmkit/kernels/decode.c can run the model, else PyTorch's eager ops)."""
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams
    from llmkit.score import perplexity

    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    eng = Engine(model, max_batch=1, max_seq_len=max(1024, len(long_ids), len(prompt_ids) + n_new) + 8,
                 compile=compile, native=native and not compile)
    if compile:
        t = time.perf_counter()
        time_decode(eng, prompt_ids, params)  # every attention bucket the timed decodes will meet
        print(f"{name}: compiled in {time.perf_counter() - t:.0f} s (cached on disk for the next run)",
              flush=True)
    return System(name, decode=lambda: time_decode(eng, prompt_ids, params),
                  prefill=lambda: time_prefill(eng, long_ids, params),
                  bytes_per_token=weight_bytes_per_token(model),
                  perplexity=lambda ids: perplexity(model, ids, window=512).ppl,
                  split=lambda: native_split(eng, prompt_ids, params) if eng._native else split_ms(model))


def native_split(eng, prompt_ids: list[int], params) -> dict[str, float]:
    """ms per decode token in the layers' matmuls, the head and attention, timed inside the native step
    during one more greedy decode (NativeDecode.profile), and that decode's ms per token ("total")."""
    eng._native.profile()
    try:
        tok_s = time_decode(eng, prompt_ids, params)
        return {**eng._native.split(), "total": 1e3 / tok_s}
    finally:
        eng._native.profile(False)


MODES = ("fp32", "bf16", "int8", "int4", "auto")
SUFFIXES = ("+compile", "+torch")  # torch.compile'd decode steps; PyTorch's eager ops (no native step)


def _how(name: str) -> dict[str, bool]:
    """Engine options of a mode name: "+compile" torch.compile'd steps, "+torch" eager PyTorch steps, else
    the native step where decode.c runs the model."""
    return {"compile": name.endswith("+compile"), "native": not name.endswith(SUFFIXES)}


def variants(model: nn.Module, modes: Sequence[str], load: Callable[[], nn.Module] | None = None
             ) -> dict[str, nn.Module]:
    """{mode: model} for fp32 (the model itself), bf16, int8, int4 (copies) and auto (`load()`: the model
    as llmkit loads it by default, e.g. a GGUF file at its own precision). A "+compile" suffix (int4+compile)
    or "+torch" is the same model, run through torch.compile or eager PyTorch ops by the caller (`_how`)."""
    from llmkit.quant import quantize_model

    out: dict[str, nn.Module] = {}
    made: dict[str, nn.Module] = {}
    for name in modes:
        mode = name.removesuffix("+compile").removesuffix("+torch")
        if mode not in made:
            if mode == "fp32":
                made[mode] = model
            elif mode == "bf16":
                made[mode] = copy.deepcopy(model).to(torch.bfloat16)
            elif mode in ("int8", "int4"):
                made[mode] = quantize_model(copy.deepcopy(model), mode)
            elif mode == "auto" and load is not None:
                made[mode] = load()
            else:
                raise LlmkitError(f"unknown mode {name!r}; choose among {', '.join(MODES)}, each optionally "
                                  "with +compile or +torch (e.g. int4+compile)")
        out[name] = made[mode]
    return out


def _linears(model: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """The matmul modules a decode step runs (a fused group once), and the vocabulary head."""
    from llmkit.quant import QuantLinear

    head = getattr(model, "lm_head", None)
    mats = [m for m in model.modules() if isinstance(m, (QuantLinear, nn.Linear)) and m is not head]
    return mats, head


@torch.inference_mode()
def split_ms(model: nn.Module, repeats: int = 5) -> dict[str, float]:
    """ms per decode token spent in the matmuls (every projection of every layer, one row each, timed alone
    in model order; a fused q/k/v or gate/up once) and in the vocabulary head: best of `repeats` passes."""
    mats, head = _linears(model)
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    xs = [torch.randn(1, m.in_features, dtype=dtype) for m in mats]

    def best(fn) -> float:
        fn()
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return 1e3 * t

    out = {"matmuls": best(lambda: [m(x) for m, x in zip(mats, xs)])}
    if head is not None:
        xh = torch.randn(1, head.in_features, dtype=dtype)
        out["head"] = best(lambda: head(xh))
    return out


def measure(systems: list[System], rounds: int, between: Callable[[], float] | None = None) -> None:
    """Run every system's decode (and prefill) once per round, A B C ... A B C, printing each round and,
    with `between`, its figure after each round (the memory bandwidth, measured again)."""
    for r in range(rounds):
        for s in systems:
            s.results["decode"].append(s.decode())
            if s.prefill:
                s.results["prefill"].append(s.prefill())
        line = ", ".join(f"{s.name} {s.results['decode'][-1]:.1f}" for s in systems)
        extra = f" | bandwidth {between():.1f} GB/s" if between else ""
        print(f"round {r + 1}/{rounds}: {line}{extra}", flush=True)


Peers = Callable[..., list["System | str"]]  # (llm, prompt_ids, long_ids, n_new, threads) -> systems or notes


def run(model_path: str | None = None, *, threads: int = 2, new_tokens: int = 128, prefill_tokens: int = 512,
        rounds: int = 3, modes: Sequence[str] = ("fp32", "bf16", "int8", "int4"),
        text: str | Path | None = None, ppl_windows: int = 8, peers: Peers | None = None,
        out: str | Path | None = None, batches: Sequence[int] = ()) -> dict:
    """Decode/prefill tok/s of llmkit's variants (and `peers`), % of roofline, ratios to the peers, the
    perplexity of `text` (its first ppl_windows x 512 tokens) when one is given, and the aggregate decode
    tok/s of each variant at each batch size in `batches`. Returns the report."""
    import llmkit
    from llmkit.hub import DEFAULT_MODEL

    torch.set_num_threads(threads)
    bw = memory_bandwidth_gbs()
    print(f"threads {threads} | memory bandwidth (copy, read+write) {bw:.1f} GB/s", flush=True)
    llm = llmkit.load(model_path or DEFAULT_MODEL, device="cpu", dtype="float32")
    prompt_ids = llm.tokenizer.encode(PROMPT, add_special_tokens=True)
    ppl_ids: list[int] = []
    if text is not None and ppl_windows > 0:
        ppl_ids = llm.tokenizer.encode(Path(text).read_text(encoding="utf-8"))
        if len(ppl_ids) < ppl_windows * 512:
            raise LlmkitError(f"{text}: {len(ppl_ids)} tokens, fewer than {ppl_windows} x 512 for perplexity")
        ppl_ids = ppl_ids[: ppl_windows * 512]
    g = torch.Generator().manual_seed(0)
    long_ids = ppl_ids[:prefill_tokens] or torch.randint(0, llm.config.vocab_size, (prefill_tokens,),
                                                         generator=g).tolist()

    def as_loaded() -> nn.Module:
        return llmkit.load(model_path or DEFAULT_MODEL, device="cpu").model

    models = variants(llm.model, modes, load=as_loaded)
    systems = [engine_system(f"llmkit {m}", v, prompt_ids, long_ids, new_tokens, **_how(m))
               for m, v in models.items()]
    for peer in peers(llm, prompt_ids, long_ids, new_tokens, threads) if peers else []:
        if isinstance(peer, System):
            systems.append(peer)
        else:
            print(peer, flush=True)
    bws = [bw]
    measure(systems, rounds, between=lambda: bws.append(memory_bandwidth_gbs()) or bws[-1])
    bw = max(bws)  # the roofline: the best bandwidth the machine showed in the run (a shared VM varies)
    print(f"roofline bandwidth: {bw:.1f} GB/s, the best of {len(bws)} measurements (start, after each round)")

    report: dict = {"threads": threads, "bandwidth_gbs": bw, "bandwidth_runs": bws, "new_tokens": new_tokens,
                    "prefill_tokens": len(long_ids), "systems": {}}
    refs = {s.ref: max(s.results["decode"]) for s in systems if s.ref}
    prefs = {s.ref: max(s.results["prefill"]) for s in systems if s.ref and s.results["prefill"]}
    cols = "".join(f" {'x ' + k:>11}" for k in refs)
    pcols = "".join(f" {'x ' + k:>11}" for k in prefs)
    print(f"\n{'system':24} {'decode tok/s':>12} {'% roofline':>10}{cols} {'prefill tok/s':>13}{pcols}")
    splits = []
    for s in systems:
        d = max(s.results["decode"])
        p = max(s.results["prefill"]) if s.results["prefill"] else float("nan")
        roof = bw * 1e9 / s.bytes_per_token if s.bytes_per_token else float("nan")
        x = {k: d / v for k, v in refs.items()}
        px = {k: p / v for k, v in prefs.items()}
        report["systems"][s.name] = {
            "decode_tok_s": d, "decode_median": statistics.median(s.results["decode"]),
            "decode_rounds": s.results["decode"], "prefill_tok_s": p, "prefill_rounds": s.results["prefill"],
            "bytes_per_token": s.bytes_per_token, "roofline_tok_s": roof, "pct_roofline": 100 * d / roof,
            "x": x, "prefill_x": px}
        print(f"{s.name:24} {d:12.1f} {100 * d / roof:9.0f}%{''.join(f' {v:11.2f}' for v in x.values())} "
              f"{p:13.1f}{''.join(f' {v:11.2f}' for v in px.values())}")
        if s.split:
            ms = s.split()
            total = ms.pop("total", 1e3 / d)  # the profiled decode's own, so the parts add up to it
            ms["rest"] = total - sum(ms.values())
            report["systems"][s.name]["ms_per_token"] = ms
            report["systems"][s.name]["split_total_ms"] = total
            splits.append((s.name, total, ms))
    if splits:
        print(f"\n{'ms per decode token':24} {'total':>7} {'matmuls':>8} {'head':>6} {'attention':>9} "
              f"{'rest':>6}   (native step: timed inside it, total = that profiled decode's; else "
              "matmuls and head timed alone, total = the best round's; rest = total - the others)")
        for name, total, ms in splits:
            att = f"{ms['attention']:9.2f}" if "attention" in ms else f"{'-':>9}"
            print(f"{name:24} {total:7.2f} {ms['matmuls']:8.2f} {ms.get('head', 0.0):6.2f} {att} "
                  f"{ms['rest']:6.2f}")

    if batches:
        print(f"\naggregate decode tok/s, {new_tokens} tokens per request")
        print(f"{'system':24} " + " ".join(f"{'batch ' + str(b):>9}" for b in batches))
        for name, m in models.items():
            agg = [time_batch_decode(m, prompt_ids, new_tokens, b, **_how(name)) for b in batches]
            report["systems"][f"llmkit {name}"]["batch_decode_tok_s"] = dict(zip(map(str, batches), agg))
            print(f"{'llmkit ' + name:24} " + " ".join(f"{a:9.1f}" for a in agg))
    if ppl_ids:
        ppl = {s.name: s.perplexity(ppl_ids) for s in systems
               if s.perplexity and not s.name.endswith(("bf16", *SUFFIXES))}  # bf16 rounds fp32's figure
        report["perplexity"] = ppl
        print(f"\nperplexity of {Path(text).name}, {ppl_windows} windows x 512 tokens:")
        for k, v in ppl.items():
            print(f"  {k:24} {v:.2f}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report
