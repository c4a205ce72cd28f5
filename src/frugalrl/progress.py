"""What a training run shows while it runs: a progress bar on a terminal, plain lines in a log.

The rich bar needs a terminal: redirected (``frugalrl train ... > train.log``) it would write
nothing until the run ends. So when stdout is not a terminal, one line goes to stdout every
``log_every`` steps (and at the first and last step), for example::

    step 60/600  reward 0.412  held-out accuracy 0.380 (step 50)  2.31 s/step  20:47 left

``reward`` is the sampled reward averaged over the steps since the previous line; the accuracy
is that of the last evaluation; seconds per step are wall-clock seconds since the first step of
this process, evaluations included; time left is that pace over the remaining steps, capped by
what ``max_wall_s`` leaves of the training time.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LINES_PER_RUN = 20  # log_every=0: about this many lines a run


def _clock(seconds: float) -> str:
    """``H:MM:SS``, or ``M:SS`` under an hour."""
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


class TrainProgress:
    """Context manager around the training loop; ``update`` after each step.

    ``start``: the step the run continues from (0 for a fresh run); ``log_every``: steps between
    plain lines (0 = about ``LINES_PER_RUN`` lines a run); ``max_wall_s``: the run's training-time
    limit (0 = none). A quiet console (the ranks other than rank 0) shows nothing.
    """

    def __init__(self, console: Console, max_steps: int, start: int, log_every: int, max_wall_s: float):
        self.max_steps, self.start, self.max_wall_s = max_steps, start, max_wall_s
        self.every = log_every or max(1, round(max_steps / LINES_PER_RUN))
        self.lines = not console.quiet and not sys.stdout.isatty()
        self.bar = Progress(TextColumn("[bold]RL[/]"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, transient=False, disable=not console.is_terminal)
        self.rewards: list[float] = []  # since the last line

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.max_steps, completed=self.start, info="")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, reward: float, last_eval: dict | None, wall_s: float, last: bool = False) -> None:
        """After ``step``: its mean sampled reward, the last evaluation row (or None), the run's
        training wall-clock seconds; ``last`` when the run stops after this step."""
        accuracy = last_eval["eval_accuracy"] if last_eval else None
        info = f"reward {reward:.2f}" + (f"  acc {accuracy:.2f}" if last_eval else "")
        self.bar.update(self.task, advance=1, info=info)
        self.rewards.append(reward)
        if not self.lines or not (last or step == self.start + 1 or step % self.every == 0 or step == self.max_steps):
            return
        pace = (time.perf_counter() - self.t0) / (step - self.start)  # seconds per step
        left = (self.max_steps - step) * pace
        if self.max_wall_s:
            left = min(left, max(0.0, self.max_wall_s - wall_s))
        held_out = f"{accuracy:.3f} (step {last_eval['step']})" if last_eval else "-"
        print(f"step {step}/{self.max_steps}  reward {sum(self.rewards) / len(self.rewards):.3f}  "
              f"held-out accuracy {held_out}  {pace:.2f} s/step  {_clock(0 if last else left)} left", flush=True)
        self.rewards = []
