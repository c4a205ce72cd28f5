"""Command line: ``frugalrl train|sft|eval|demo|vstar [--config FILE] [key=value ...]``,
``frugalrl bench NAME [--config FILE] [key=value ...]`` and ``frugalrl compare RUN_DIR ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from frugalrl import bench
from frugalrl.config import ConfigError, format_help, load_config

COMMANDS = {
    "train": "RL training (the main job): prompts -> rollouts -> rewards -> advantages -> update",
    "sft": "supervised warm-up of the embedded model on worked solutions (cached; train does it when needed)",
    "eval": "greedy accuracy and pass@k of a model on the task's held-out split",
    "demo": "train, then print accuracy before and after RL (the embedded default; make demo-real: SmolLM2)",
    "vstar": "A*-PO stage 1: V* of every training prompt from algo.vstar_n samples of the starting model, "
             "cached for `train algo.estimator=astar`",
    "bench": "measurements written to bench/results/: value (baseline MSE per estimator), grad "
             "(policy-gradient MSE per estimator), rollout (generation throughput), train (every preset at "
             "equal samples), real (the methods on SmolLM2-135M: which toy conclusions hold), peer (frugalrl vs TRL's GRPOTrainer: step time, memory, accuracy), warmup (the "
             "embedded model's SFT over seeds and pools), demo (`frugalrl demo` over seeds, from an empty cache), "
             "tasks (reasoning-gym tasks from an empty cache, max_steps=2) or scale (peak memory per process, "
             "ddp vs fsdp)",
    "compare": "several runs side by side: held-out accuracy and sampled reward on shared axes (a PNG) and a "
               "table of final and best accuracy, the cost of reaching an accuracy and the filter's savings",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frugalrl", description="RL for language models on checkable reasoning tasks, on a small "
        "sampling budget.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options are key=value pairs after the command; `frugalrl train --help` lists them all.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        if name == "compare":
            _compare_parser(sub.add_parser(name, help=help_text, description=help_text))
            continue
        epilog = format_help() if name != "bench" else bench.options_help() + "\nrun config:\n" + format_help()
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "bench":
            p.add_argument("bench", choices=list(bench.BENCHES), help="; ".join(f"{k}: {v}" for k, v in
                                                                               bench.BENCHES.items()))
        p.add_argument("--config", metavar="FILE", help="YAML file of options (overridden by key=value pairs)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. max_steps=100")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        if name == "train":
            p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete "
                           "checkpoint; its config.yaml is the base config, key=value pairs change it")
    return parser


def _compare_parser(p: argparse.ArgumentParser) -> None:
    from frugalrl.compare import X_AXES

    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of frugalrl train), "
                   "finished or still running")
    p.add_argument("--x", choices=list(X_AXES), default="step", help="x axis: training step, completions "
                   "sampled, or training wall-clock seconds (default: step)")
    p.add_argument("--out", metavar="FILE.png", default="compare.png", help="where the plot goes (default: "
                   "compare.png)")
    p.add_argument("--target", type=float, metavar="ACC", help="held-out accuracy whose cost (completions, wall "
                   "time) the table gives (default: the best accuracy that every run reached)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _resume_dir(args) -> str | None:
    """The run to continue: ``--resume RUN_DIR``, else the last ``resume=RUN_DIR`` override."""
    found = None
    for text in args.overrides:
        key, eq, value = text.partition("=")
        if eq and key.strip() == "resume":
            found = value.strip() or None
    return getattr(args, "resume", None) or found


def _config(args):
    """Defaults, then --config, then key=value pairs; when resuming, the run's own config.yaml
    (with output_dir = the run directory) takes the place of the defaults."""
    run_dir = _resume_dir(args)
    if not run_dir:
        return load_config(args.config, args.overrides)
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"resume={run_dir}: no config.yaml there; give the output_dir of the run to continue")
    base = load_config(saved).model_copy(update={"output_dir": run_dir})
    return load_config(args.config, [*args.overrides, f"resume={run_dir}"], base=base)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _run(args, console: Console) -> int:
    if args.command == "bench":
        print(json.dumps(bench.run(args.bench, args.config, args.overrides, console)))
        return 0
    if args.command == "compare":
        from frugalrl.compare import compare

        print(compare(args.runs, x=args.x, out=args.out, target=args.target))
        console.print(f"plot: {args.out}")
        return 0
    cfg = _config(args)
    if args.command in ("train", "demo"):
        from frugalrl.trainer import train

        result = train(cfg, console)
        if args.command == "demo":
            print(f"demo: accuracy before={result.accuracy_before:.3f} after={result.accuracy_after:.3f}")
        return 0
    if args.command == "vstar":
        from frugalrl.models import cpu_threads
        from frugalrl.trainer import load_inputs
        from frugalrl.vstar import build_cache

        with cpu_threads(cfg.threads):
            task, model, tokenizer, _ = load_inputs(cfg, console)
            print(json.dumps(build_cache(cfg, model, tokenizer, task, console)))
        return 0
    if args.command == "sft":
        from frugalrl.models import build_embedded_sft, cpu_threads, embedded_sft_path

        path = cfg.model.name_or_path or embedded_sft_path(cfg)
        with cpu_threads(cfg.threads):
            info = build_embedded_sft(cfg, path, console)
        print(json.dumps({"path": str(path), **info}))
        return 0
    if args.command == "eval":
        from frugalrl.evaluation import evaluate
        from frugalrl.trainer import load_inputs

        task, model, tokenizer, _ = load_inputs(cfg, console)
        result = evaluate(model, tokenizer, task.eval_rows, task.reward_fn,
                          max_new_tokens=cfg.rollout.max_new_tokens, pass_k=cfg.eval.pass_k,
                          temperature=cfg.eval.temperature)
        counts = {"prompts": len(task.eval_rows)}
        if task.eval_rows and all(r.get("task") for r in task.eval_rows):  # reasoning-gym: per-task counts
            for name in sorted({r["task"] for r in task.eval_rows}):
                counts[f"prompts/{name}"] = sum(r["task"] == name for r in task.eval_rows)
        print(json.dumps({**counts, **result}))
        return 0
    raise AssertionError(args.command)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with key=value pairs allowed on either side of ``--config``: argparse
    would give a command's positionals (``bench NAME`` and the pairs) only the words before it."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening; HF's per-file bars are noise
    console = Console(stderr=True)
    # Exit codes: 2 bad input (config, data, model files, rewards), 1 training diverged,
    # 128 + signal number when SIGINT (130) or SIGTERM (143) stopped it.
    try:
        return _run(args, console)
    except (ConfigError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"frugalrl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from frugalrl.recovery import TrainingDiverged  # torch is loaded by now, so this costs nothing

        if args.debug or not isinstance(e, TrainingDiverged):
            raise
        print(f"frugalrl {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted (checkpoint saved) or a plain Ctrl-C
        print(f"frugalrl {args.command}: {_one_line(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
