"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases, MLflow, trackio.

Every tracker gets what ``metrics.jsonl`` gets, under the same keys and at the same steps
(training rows and evaluation rows), the run's config, and at each evaluation a small table of
held-out prompts with the model's greedy completion and its reward. Each backend is an optional
extra (``pip install 'frugalrl[wandb]'``) and is imported only when asked for.

Nothing here waits on the network unless the user's environment asks for it:

* TensorBoard writes event files to ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs``).
* W&B runs in offline mode under ``RUN_DIR/wandb`` (``wandb sync RUN_DIR/wandb/offline-run-*``
  uploads it later) unless ``WANDB_MODE`` / ``WANDB_DIR`` say otherwise.
* MLflow writes to a SQLite store ``RUN_DIR/mlflow.db`` with artifacts in
  ``RUN_DIR/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``) unless
  ``MLFLOW_TRACKING_URI`` names another store. Its metric names allow no '@', so ``eval_pass@4``
  is logged there as ``eval_pass_at_4``.
* trackio writes to its local database (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``;
  ``trackio show`` opens it) and launches no dashboard.

A resumed run (``--resume``) starts a new tracker run of the same name from the step after its
checkpoint; TensorBoard, which shows one directory as one run, drops the earlier run's events
from that step on (``purge_step``).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from frugalrl.config import config_to_dict, flatten

if TYPE_CHECKING:
    from frugalrl.config import Config

# The table each tracker gets at an evaluation: one row per held-out prompt (evaluation.examples).
EXAMPLE_COLUMNS = ("prompt", "completion", "answer", "reward")
EXAMPLES_KEY = "eval_examples"


class Tracker(Protocol):
    """One experiment tracker, opened for one run (``__init__(cfg, run_dir, start)``)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Scalars of one metrics row at ``step`` (training steps; 0 = before training)."""

    def log_examples(self, examples: list[dict], step: int) -> None:
        """The evaluation's example table (``EXAMPLE_COLUMNS``) at ``step``."""

    def close(self, ok: bool) -> None:
        """Flush and finish the run; ``ok`` is False when training stopped on an exception."""


def _cells(examples: list[dict]) -> list[list]:
    return [[e[c] for c in EXAMPLE_COLUMNS] for e in examples]


class TensorBoardTracker:
    def __init__(self, cfg: Config, run_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: the steps after a resumed checkpoint run again; TensorBoard then hides the
        # first attempt's events for them instead of drawing both.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(config_to_dict(cfg)).items()),
                             start)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_examples(self, examples: list[dict], step: int) -> None:
        def cell(value) -> str:  # a Markdown table cell: no line breaks, no column separators
            return " ".join(str(value).split()).replace("|", "\\|")

        lines = ["| " + " | ".join(EXAMPLE_COLUMNS) + " |", "|" + " --- |" * len(EXAMPLE_COLUMNS)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in _cells(examples)]
        self.writer.add_text(EXAMPLES_KEY, "\n".join(lines), step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class _WandbStyle:
    """Logging through W&B's API, which trackio copies: ``run.log(dict, step=)`` and the
    module's ``Table``. Subclasses set ``self.module`` (wandb or trackio) and ``self.run``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_examples(self, examples: list[dict], step: int) -> None:
        table = self.module.Table(columns=list(EXAMPLE_COLUMNS), data=_cells(examples))
        self.run.log({EXAMPLES_KEY: table}, step=step)


class WandbTracker(_WandbStyle):
    def __init__(self, cfg: Config, run_dir: Path, start: int):
        import wandb

        self.module = wandb
        # None lets WANDB_MODE / WANDB_DIR decide where the user set them
        self.run = wandb.init(project=cfg.project, name=run_name(cfg), config=config_to_dict(cfg),
                              mode=None if os.environ.get("WANDB_MODE") else "offline",
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir))

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker:
    BATCH = 100  # MLflow takes at most 100 params per log_batch call

    def __init__(self, cfg: Config, run_dir: Path, start: int):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self.Metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name(cfg.project)
        artifacts = None if uri else (run_dir / "mlartifacts").resolve().as_uri()  # else the server's choice
        experiment_id = (experiment.experiment_id if experiment else
                         self.client.create_experiment(cfg.project, artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name(cfg)).info.run_id
        params = [Param(k, str(v)) for k, v in flatten(config_to_dict(cfg)).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(key.replace("@", "_at_"), value, now_ms, step)
                                                    for key, value in metrics.items()])

    def log_examples(self, examples: list[dict], step: int) -> None:
        self.client.log_dict(self.run_id, {"columns": list(EXAMPLE_COLUMNS), "data": _cells(examples)},
                             f"{EXAMPLES_KEY}/step_{step:07d}.json")

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class TrackioTracker(_WandbStyle):
    def __init__(self, cfg: Config, run_dir: Path, start: int):
        import trackio

        self.module = trackio
        # embed=False: no dashboard server; without space_id/server_url trackio stays local
        self.run = trackio.init(project=cfg.project, name=run_name(cfg), config=config_to_dict(cfg), embed=False)

    def close(self, ok: bool) -> None:
        self.module.finish()  # this run, which trackio.init made current; also spares it trackio's exit hook


# report_to name -> (tracker, the modules it imports); the names are those TRL and transformers use
BACKENDS: dict[str, tuple[type, tuple[str, ...]]] = {
    "tensorboard": (TensorBoardTracker, ("tensorboard",)),
    "wandb": (WandbTracker, ("wandb",)),
    "mlflow": (MlflowTracker, ("mlflow", "sqlalchemy", "alembic")),  # its SQLite store needs the last two
    "trackio": (TrackioTracker, ("trackio",)),
}


def backends(report_to: str | list[str]) -> list[str]:
    """The tracker names ``report_to`` asks for, in order, without repeats ([] for ``none``);
    raises ValueError for an unknown name or a backend that is not installed.

    A list, or text as an override gives it: ``wandb``, ``[tensorboard, wandb]``, ``tensorboard,wandb``.
    """
    text = report_to if isinstance(report_to, str) else ",".join(report_to)
    out = []
    for name in re.split(r"[\s,\[\]]+", text):
        if not name or name.lower() == "none" or name in out:
            continue
        if name not in BACKENDS:
            close = difflib.get_close_matches(name, BACKENDS, n=1)
            raise ValueError(f"report_to: unknown tracker {name!r}; choose from {', '.join(BACKENDS)} or none"
                             + (f" (did you mean {close[0]!r}?)" if close else ""))
        missing = [m for m in BACKENDS[name][1] if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"report_to={name} needs {', '.join(missing)}, which is not installed: "
                             f"pip install 'frugalrl[{name}]'")
        out.append(name)
    return out


def run_name(cfg: Config) -> str:
    """The run's name in the trackers: ``run_name``, else the run directory's name."""
    return cfg.run_name or Path(cfg.output_dir).resolve().name


def _scalars(row: dict) -> dict[str, float]:
    """A metrics row's numbers, without ``step`` (the trackers' own axis); None (not measured) is left out."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one run, as a context manager that finishes them (``ok`` = no exception).

    ``Trackers.open(cfg, run_dir, start)`` opens those ``cfg.report_to`` names; ``Trackers()``
    is none (the ranks other than rank 0, which logs for the run).
    """

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = trackers or []

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, start: int) -> Trackers:
        """``start``: the step the run continues from (0 for a fresh run)."""
        opened = cls()
        try:
            for name in backends(cfg.report_to):
                opened.trackers.append(BACKENDS[name][0](cfg, run_dir, start))
        except BaseException:  # one that fails to open: finish those already open
            opened.__exit__(*sys.exc_info())
            raise
        return opened

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, row: dict) -> None:
        """One metrics.jsonl row, at its ``step``."""
        for tracker in self.trackers:
            tracker.log(_scalars(row), row["step"])

    def log_examples(self, examples: list[dict], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_examples(examples, step)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for tracker in self.trackers:
            tracker.close(ok=exc_type is None)
