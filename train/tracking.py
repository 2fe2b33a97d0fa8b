"""Experiment tracking through W&B: only rank 0 talks to it; every other rank gets a silent no-op.

Modes (tracking.wandb_mode): "online" needs an account and the network; "offline" writes
`<run_dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb` (read it back with
train.wandb_records.read_run, upload later with `wandb sync`); "disabled" never imports wandb.

Resuming: the trainer saves `tracker.run_id` in its checkpoints and passes it back with resume=True,
so the same W&B run continues (resume="allow"). Online, W&B ignores rows logged at a step below the
run's last step ("Steps must be monotonically increasing"): the steps between the checkpoint and a
crash keep their first values. Offline, each start writes its own offline-run-* folder carrying the
same run id.
"""
from __future__ import annotations

import os
import secrets
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from train.config import TrackingConfig
from train.meters import to_scalar

if TYPE_CHECKING:
    from PIL.Image import Image


# W&B's own run-id alphabet and length (wandb.sdk.lib.runid; 0.31 no longer exports
# wandb.util.generate_id).
_ID_CHARS = string.ascii_lowercase + string.digits


RUN_ID_FILE = "wandb_run_id"
WANDB_FLUSH_S = 1.0


def new_run_id(length: int = 8) -> str:
    """A fresh W&B run id. `secrets`, not `random`: the trainer seeds `random`, and seeded ids repeat."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(length))


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, run_id: str | None, rank: int,
                 resume: bool) -> None:
        self.cfg = cfg
        self.rank = rank
        self._run: Any = None
        self._offline_run_dir: Path | None = None
        # Other ranks never learn a generated id; the id rank 0 saves in the checkpoint is the one. Rank 0
        # also keeps it in the run folder from the start: a run that ends before its first checkpoint
        # (a crash, a kill) continues the same W&B run when started again, instead of forking a second.
        self._run_id = run_id
        if rank != 0:
            return
        id_file = Path(run_dir) / RUN_ID_FILE
        if self._run_id is None and id_file.is_file():
            self._run_id, resume = id_file.read_text().strip() or None, True
        self._run_id = self._run_id or new_run_id()
        if cfg.wandb_mode == "disabled":
            return
        if cfg.wandb_mode not in ("online", "offline"):
            raise ValueError(f"tracking.wandb_mode={cfg.wandb_mode!r}: choose online, offline or disabled")
        # Imported here so that other ranks and disabled runs neither pay for the import nor start
        # wandb's background service.
        import wandb

        self._wandb = wandb
        run_dir = Path(run_dir)
        # Made here so that an unusable run_dir fails loudly: wandb would fall back to the system temp
        # dir with only a warning (hidden by WANDB_SILENT).
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self._run_id + "\n")
        run_name, stage = _names(config)
        # wandb tells child processes about its service through WANDB_SERVICE. A trainer started from a
        # process that used wandb itself (a test runner, a notebook, a sweep driver) inherits it and
        # fails to connect once that process has torn its service down: start our own instead.
        os.environ.pop("WANDB_SERVICE", None)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            dir=os.fspath(run_dir),
            mode=cfg.wandb_mode,
            id=self._run_id,
            # "allow": continue the run with this id if it exists, create it otherwise.
            resume="allow" if resume else None,
            config=_plain(config),
            name=f"{run_name}/{stage}" if run_name and stage else run_name,
            group=run_name,
            job_type=stage,
            # wandb-core writes the run's records to its file every 15 s by default, and a trainer killed
            # outright (kill -9, the OOM killer) takes it down with it: the records since the last write
            # were lost, and a resume does not log the steps up to its checkpoint again.
            # (A private setting: passed only where this wandb has it.)
            settings=wandb.Settings(**({"x_transaction_log_flush_interval": WANDB_FLUSH_S}
                                       if "x_transaction_log_flush_interval" in wandb.Settings.model_fields else {})),
        )
        if cfg.wandb_mode == "offline":
            self._offline_run_dir = Path(self._run.settings.sync_dir)

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def offline_run_dir(self) -> Path | None:
        """This process's `wandb/offline-run-<time>-<id>[-N]` folder (still set after finish()).

        wandb appends -1, -2... when a folder with the same second and id exists (a quick restart).
        """
        return self._offline_run_dir

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars at `step`. 0-d tensors are read here (a device sync): call on log steps only."""
        if self._run is None:
            return
        self._run.log({key: to_scalar(value) for key, value in metrics.items()}, step=step)

    def log_images(self, key: str, images: torch.Tensor | list[Image], captions: list[str],
                   step: int) -> None:
        """Sample images with one caption each: a [B,3,H,W] tensor in [0,1] or a list of PIL images."""
        if self._run is None:
            return
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
            arrays = list(images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
                          .permute(0, 2, 3, 1).cpu().numpy())
        else:
            arrays = list(images)
        if len(arrays) != len(captions):
            raise ValueError(f"{len(arrays)} images but {len(captions)} captions")
        self._run.log({key: [self._wandb.Image(img, caption=cap) for img, cap in zip(arrays, captions)]},
                      step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is None:
            return
        self._run.summary.update(_plain(values))

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close the run; when it returns the run's files are complete. Idempotent.

        In wandb 0.31 `run.finish()` returns before wandb-core has closed the run: the closing request
        is fire-and-forget and the last block of the .wandb file is written afterwards (a read right
        after finish() saw a torn file in about half of the offline runs here). wandb-core completes it
        in the background, which survives os._exit but not a kill of the whole process group (e.g. the
        end of a Slurm job step). `wandb.teardown()` returns once the service process has exited, which
        is after it closed every run (it handles requests in order), so it is called here. It also ends
        any other W&B run of this process; the trainer has none.
        """
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        finally:
            self._wandb.teardown()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _names(config: Mapping) -> tuple[str | None, str | None]:
    """(run name, stage name) from the trainer's config: W&B name "<run>/<stage>", group <run>."""
    run, stage = config.get("run"), config.get("stage")
    return (run.get("name") if isinstance(run, Mapping) else None,
            stage.get("name") if isinstance(stage, Mapping) else None)


def _plain(value: Any) -> Any:
    """JSON-friendly copy (also of an OmegaConf config): paths become strings, tensors python numbers."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    try:
        return to_scalar(value)
    except TypeError:
        return value  # left to wandb's own encoder (enums, dataclasses...)
