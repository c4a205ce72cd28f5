"""Rollout bench: generation tokens/s of frugalrl's sampler against Hugging Face ``generate``,
and against a compute ceiling.

Protocol of ``frugalrl bench rollout``:

* Model: the run config's (by default the embedded model), as loaded for training; prompts: the
  first B training prompts, for each B in ``bench.batches``, each continued by exactly
  ``bench.new_tokens`` tokens with EOS disabled, so both samplers make the same number of
  tokens, at ``rollout.temperature`` and top-p.
* frugalrl's sampler (``fastgen.generate``, what training rollouts use for Llama/Qwen2) and
  ``model.generate`` (KV cache, sampling, top_k=0) alternate in one process, ``bench.rounds``
  rounds after one warm-up call each. tokens/s = B x new_tokens / seconds of one call, prefill
  included; the median over rounds is reported.
* Ceiling: the machine's measured matmul FLOP/s (best of 5 timed n x n matmuls,
  ``bench.matmul_size``, in the model's dtype on its device) divided by the model's FLOPs per
  generated token: 2 x non-embedding parameters (attention and MLP weights) + 2 x hidden x vocab
  (lm_head) + 4 x layers x attention width x mean context (scores and their weighted sum over
  prompt + new_tokens / 2 positions). A small model's decode step is far from matmul-bound, so
  ``rollout_fraction_of_ceiling`` says how much of the machine's arithmetic becomes tokens.
* Training: the largest batch's prompts with their fastgen completions, through the training
  forward pass (``rollout.forward_completions``, as the update makes it) and its backward, in
  micro-batches of ``train.micro_batch``, ``bench.rounds`` times after one warm-up. Trained
  tokens/s counts every real token of the sequences (prompt and completion: both go through
  forward and backward); its ceiling is the matmul FLOP/s over 6 x N FLOPs per token (N = the
  model's parameters), so ``rollout_train_fraction_of_ceiling`` is the training's share of the
  machine's arithmetic.
* Work: the ceiling counts generated tokens only, but every call also prefills its prompts (each
  distinct prompt once). ``rollout_work_fraction_of_ceiling`` counts those prompt tokens too, each
  costed as a generated token (attention over a shorter context makes that a slight
  overestimate): the share of the machine's arithmetic that the sampler does, where
  ``rollout_fraction_of_ceiling`` is the share that ends up as new tokens.
* ``bench.group_size`` G > 1 samples as training does: B / G distinct prompts, each G times
  (fastgen prefills each once, and a prefix they all start with once: ``prefilled_tokens``; HF
  ``generate`` prefills every row). The training pass runs whole rows either way, so that its
  tokens/s are tokens computed.
* ``bench.label`` (e.g. ``real`` for SmolLM2) writes ``rollout-LABEL.md`` and summary keys
  ``LABEL_rollout_ceiling_fraction``, ``LABEL_train_ceiling_fraction`` and
  ``LABEL_work_ceiling_fraction`` (plus LABEL-prefixed tokens/s), so that several models' pages
  live side by side.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from frugalrl import fastgen
from frugalrl.bench.options import RolloutOptions
from frugalrl.bench.report import fmt, publish, table
from frugalrl.config import Config
from frugalrl.rollout import attention_width, encode_prompts, forward_completions, make_rollout, non_embedding_params
from frugalrl.trainer import load_inputs, set_seed

TRAIN_DEFAULTS: list[str] = []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` (n, n) @ (n, n) products (2 n^3 FLOPs each), after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def flops_per_token(model, context: float) -> float:
    """FLOPs of one decode step of one sequence attending over ``context`` positions."""
    c = model.config
    head = model.get_output_embeddings().weight
    return (2 * non_embedding_params(model) + 2 * head.numel()
            + 4 * c.num_hidden_layers * attention_width(c) * context)


def prefilled_tokens(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Prompt tokens fastgen prefills for the distinct left-padded prompts ``ids`` (U, P): each
    once, and a prefix that all of them start with once (``fastgen.prefix_to_share``)."""
    n = fastgen.prefix_to_share(ids, mask)
    return int(mask.sum()) - (ids.shape[0] - 1) * n


def _time_call(fn, device: torch.device, tokens: int) -> float:
    """tokens/s of one call of ``fn`` that must return a (B, new_tokens) tensor of new tokens."""
    _sync(device)
    t0 = time.perf_counter()
    new = fn()
    _sync(device)
    if new.numel() != tokens:
        raise RuntimeError(f"a sampler made {new.numel()} tokens instead of {tokens}: EOS was not disabled")
    return tokens / (time.perf_counter() - t0)


def train_tokens_per_s(model, rollout, micro_batch: int, rounds: int, device: torch.device) -> float:
    """Median tokens/s (prompt and completion tokens) of the training forward and backward over
    ``rollout`` in micro-batches of ``micro_batch``, over ``rounds`` timed passes after a warm-up."""
    tokens = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
    model.train()
    speeds = []
    for i in range(rounds + 1):
        _sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(rollout), micro_batch):
            part = rollout.select(slice(start, start + micro_batch)).trimmed()
            forward_completions(model, part).logprobs.sum().backward()
        _sync(device)
        if i:  # the first pass warms the allocator
            speeds.append(tokens / (time.perf_counter() - t0))
        model.zero_grad(set_to_none=True)
    model.eval()
    return statistics.median(speeds)


def _samplers(model, enc: dict, T: int, pad_id: int, temperature: float, top_p: float) -> dict:
    """The two samplers as calls that continue the prompts ``enc`` by exactly T tokens each."""
    def fast():
        return fastgen.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=T, eos_token_id=None,
                                pad_token_id=pad_id, temperature=temperature, top_p=top_p).tokens

    def hf():
        # eos_token_id=None as an argument (not inside a GenerationConfig) turns stopping off
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=T, eos_token_id=None, pad_token_id=pad_id)
        return out[:, enc["input_ids"].shape[1]:]

    return {"fast": fast, "hf": hf}


def _plot(batches: list[int], fast: dict, hf: dict, ceiling: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(batches))
    ax.bar([i - 0.2 for i in x], [fast[b] for b in batches], 0.4, label="frugalrl (fastgen)")
    ax.bar([i + 0.2 for i in x], [hf[b] for b in batches], 0.4, label="Hugging Face generate")
    ax.axhline(ceiling, ls="--", color="grey", label="ceiling: matmul FLOP/s / FLOPs per token")
    ax.set_xticks(list(x), [f"{b} prompts" for b in batches])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, opts: RolloutOptions, command: str, console: Console) -> dict:
    """Measure, write rollout.md and rollout.png (or rollout-LABEL.*), merge the headline numbers into summary.json
    and return them."""
    set_seed(cfg.seed)
    task, model, tokenizer, _ = load_inputs(cfg, console)
    if not fastgen.supports(model):
        raise ValueError(f"{type(model).__name__} cannot use frugalrl's fast sampler (Llama and Qwen2 models only); "
                         "there is nothing to compare")
    batches, G = sorted(set(opts.batches)), opts.group_size
    if not batches or batches[0] < 1 or batches[-1] > len(task.train_rows) * G or any(B % G for B in batches):
        raise ValueError(f"bench.batches={opts.batches} must be multiples of bench.group_size={G} between {G} and "
                         f"{len(task.train_rows) * G} ({len(task.train_rows)} training prompts x G)")
    model.eval()
    param = next(model.parameters())
    device, T, ro = param.device, opts.new_tokens, cfg.rollout
    fast, hf, context, prefill = {}, {}, {}, {}
    for B in batches:
        prompts = [r["prompt"] for r in task.train_rows[:B // G] for _ in range(G)]
        enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts).items()}
        context[B] = enc["input_ids"].shape[1] + T / 2
        prefill[B] = prefilled_tokens(enc["input_ids"][::G], enc["attention_mask"][::G])
        samplers = _samplers(model, enc, T, tokenizer.pad_token_id, ro.temperature, ro.top_p)
        speeds = {name: [] for name in samplers}
        with torch.no_grad():
            for fn in samplers.values():
                fn()  # warm-up: allocator, kernels, lazy initialisation
            for _ in range(opts.rounds):
                for name, fn in samplers.items():
                    speeds[name].append(_time_call(fn, device, B * T))
        fast[B], hf[B] = statistics.median(speeds["fast"]), statistics.median(speeds["hf"])
        console.print(f"rollout bench: {B} prompts x {T} tokens: fastgen {fast[B]:,.0f} tok/s, HF {hf[B]:,.0f} tok/s")

    top = batches[-1]
    with torch.no_grad():
        new = samplers["fast"]()  # the largest batch's encoding and samplers are the loop's last
    trained = train_tokens_per_s(model, make_rollout(tokenizer, enc, new, []), cfg.train.micro_batch, opts.rounds,
                                 device)
    params = sum(p.numel() for p in model.parameters())
    flops = matmul_flops(opts.matmul_size, param.dtype, device)
    ceiling = {B: flops / flops_per_token(model, context[B]) for B in batches}
    train_ceiling = flops / (6 * params)
    console.print(f"rollout bench: training forward and backward: {trained:,.0f} tok/s "
                  f"({trained / train_ceiling:.2f} of the ceiling)")
    fractions = {"rollout": fast[top] / ceiling[top], "train": trained / train_ceiling,
                 "work": fast[top] * (1 + prefill[top] / (top * T)) / ceiling[top]}
    if opts.label:
        summary = {**{f"{opts.label}_{k}_ceiling_fraction": v for k, v in fractions.items()},
                   f"{opts.label}_rollout_fastgen_vs_hf": fast[top] / hf[top],
                   f"{opts.label}_rollout_fastgen_tok_s": fast[top], f"{opts.label}_train_tok_s": trained}
    else:  # the embedded model's keys, as they have always been named
        summary = {"rollout_fastgen_vs_hf": fast[top] / hf[top], "rollout_fraction_of_ceiling": fractions["rollout"],
                   "rollout_work_fraction_of_ceiling": fractions["work"],
                   "rollout_train_fraction_of_ceiling": fractions["train"], "rollout_train_tok_s": trained,
                   "rollout_matmul_gflop_s": flops / 1e9,
                   **{f"rollout_fastgen_tok_s_b{B}": fast[B] for B in batches},
                   **{f"rollout_hf_tok_s_b{B}": hf[B] for B in batches}}
    results_dir = Path(opts.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    title = f"{params / 1e6:.2f} M-parameter model, {T} new tokens, {param.dtype}, {device}"
    _plot(batches, fast, hf, ceiling[top], results_dir / f"{opts.page('rollout')}.png", title)
    rows = [[str(B), f"{fast[B]:,.0f}", f"{hf[B]:,.0f}", fmt(fast[B] / hf[B], 3), f"{ceiling[B]:,.0f}",
             fmt(fast[B] / ceiling[B], 3)] for B in batches]
    sections = [
        f"Generated tokens/s ({title}, median of {opts.rounds} alternating rounds, prefill included, "
        f"EOS disabled; {torch.get_num_threads()} torch threads; "
        + (f"B / {G} distinct prompts, each {G} times" if G > 1 else "B distinct prompts")
        + "). Protocol: `src/frugalrl/bench/rollout.py`.",
        table(["prompts", "fastgen tok/s", "HF generate tok/s", "fastgen / HF", "ceiling tok/s",
               "fastgen / ceiling"], rows),
        f"Ceiling: measured {param.dtype} matmul {flops / 1e9:.1f} GFLOP/s ({opts.matmul_size}^2 matrices) / "
        f"{flops_per_token(model, context[top]) / 1e6:.2f} MFLOP per generated token at mean context "
        f"{context[top]:.0f}.",
        f"Training (the {top} prompts with their completions, forward and backward in micro-batches of "
        f"{cfg.train.micro_batch}, median of {opts.rounds}): {trained:,.0f} tokens/s against a ceiling of "
        f"{train_ceiling:,.0f} (6 x {params / 1e6:.1f} M FLOPs per token): **{fractions['train']:.2f}** of it"
        " (whole rows, every token computed; `train.share_prompts` computes fewer). "
        f"Generation at {top} prompts: **{fractions['rollout']:.2f}** of its ceiling in generated tokens; "
        f"counting the {prefill[top]:,} prompt tokens prefilled per call as well ({prefill[top] / (top * T):.2f} per "
        f"generated token, each costed as a generated one), the arithmetic done is **{fractions['work']:.2f}** of "
        "the machine's.",
    ]
    return publish(results_dir, opts.page("rollout"), "Rollout bench: generation and training throughput", command,
                   sections, summary, console)
