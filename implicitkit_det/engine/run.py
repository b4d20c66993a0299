"""Whole runs from a :class:`~.run_config.RunConfig`: :func:`fit` (train, with evaluation) and
:func:`evaluate_checkpoint`. The command line is a thin layer over these; any script can call them.

A training run folder holds ``config.json`` (the settings), ``metrics.jsonl`` (one JSON object per epoch),
``checkpoint_last.pth`` (every epoch, every ``checkpoint_every`` iterations, and on Ctrl-C),
``checkpoint_best.pth`` (best AP so far), ``checkpoint_epoch{N}.pth`` (every ``keep_every`` epochs),
``training_curves.png``, and with ``log_steps`` ``steps.jsonl``.

Resuming is exact: the data order of an epoch depends only on ``(seed, epoch)``, every sample's
augmentation only on ``(seed, epoch, image)`` (:mod:`implicitkit_det.data.seeding`), evaluation draws
nothing from the generators training uses, and the checkpoint holds every process's random state and the
position in the epoch. A run resumed from any checkpoint ends with the same parameters as one never
stopped (on the same hardware and number of processes).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from ..collectives import any_process, gather_object, get_rank, is_main_process
from ..evaluation import CocoEvaluator
from ..models.detector import QueryDetector
from ..models.registry import with_backbone_layout
from .checkpoint import (
    BEST,
    LAST,
    copy_checkpoint,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .evaluate import EvaluationStopped, evaluate
from .host_memory import keep_freed_host_memory
from .interrupt import StopRequest, TrainingInterrupted
from .optim import adamw, build_scheduler, param_groups, retarget_scheduler
from .predict import Detector, save_prediction_grid
from .process_group import DistInfo, init_distributed, per_process_batch_norms, unwrap, wrap_ddp
from .progress import (
    RunPosition,
    StepLog,
    evaluation_banner,
    plot_training_curves,
    rewind_jsonl,
    training_banner,
)
from .refinement import refinement_curve, save_refinement_curve, training_depth
from .run_config import RunConfig, RunConfigError, test_settings_of
from .run_setup import (
    RunData,
    build_run_model,
    load_data,
    make_eval_loader,
    make_train_loader,
    prepare_output_dir,
    say,
    seed_everything,
)
from .train import EpochMeter, StepResult, headline, make_grad_scaler, train_one_epoch

__all__ = ["evaluate_checkpoint", "fit", "model_record"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (an evaluation, a picture) without moving the generators training draws from."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def model_record(cfg: RunConfig, data: RunData) -> dict[str, Any]:
    """What rebuilds the model: the checkpoint's ``config`` entry (also read by ``predict``)."""
    return {
        "name": cfg.config,
        "num_classes": data.val.num_classes,
        # With the backbone's norm and frozen stages written out: rebuilt from these options without its
        # weights file (as build_model(name, num_classes, **overrides) does once the path is dropped), a
        # pre-trained backbone would take the from-scratch defaults instead.
        "overrides": with_backbone_layout(cfg.config, cfg.overrides),
        "class_names": list(data.val.category_names),
        "input_size": [cfg.image_size, cfg.max_size],
        "test_settings": test_settings_of(cfg),
    }


def _test_settings(model: nn.Module) -> dict[str, Any]:
    inner = unwrap(model)
    return dict(inner.test_settings) if isinstance(inner, QueryDetector) else {}


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    if is_main_process():
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _val_loader(cfg: RunConfig, data: RunData, info: DistInfo) -> Any:
    if data.val_loader is None:
        data.val_loader = make_eval_loader(cfg, data.val, info.device, data.paths.digits)
    return data.val_loader


def _evaluate(cfg: RunConfig, model: nn.Module, data: RunData, info: DistInfo, epoch: int, **kw: Any) -> dict:
    loader = _val_loader(cfg, data, info)
    say(f"evaluating on {len(data.val)} images ({data.paths.val_ann})")
    with preserved_rng():
        stats = evaluate(
            model, loader, CocoEvaluator(data.val.coco), device=info.device,
            label_to_category_id=data.val.label_to_category_id, amp=cfg.amp, max_iters=cfg.max_iters, log=say,
            progress=True, **kw,
        )  # fmt: skip
    stats.update(_test_settings(model))
    steps = f"  steps/image {stats['mean_steps']:.2f}" if "mean_steps" in stats else ""
    say(f"epoch {epoch}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  AP75 {stats['AP75']:.4f}{steps}")
    return stats


def evaluate_checkpoint(cfg: RunConfig) -> dict[str, Any]:
    """Evaluate the checkpoint `cfg.resumed_from` on the validation split (``--eval-only``).

    Returns:
        The COCO stats (with ``images``: the distinct images scored over all processes, and the
        test-time settings used); appends ``{"epoch", "eval"}`` to ``metrics.jsonl`` in the output folder.
    """
    keep_freed_host_memory()  # the evaluation's large tensors reuse memory, as training's do
    info = init_distributed(cfg.device)
    cfg = prepare_output_dir(cfg)
    checkpoint = read_checkpoint(cfg.resumed_from)  # type: ignore[arg-type]
    data = load_data(cfg, train=False, class_names=(checkpoint.get("config") or {}).get("class_names"))
    model = build_run_model(cfg, data.val.num_classes, info.device)
    load_checkpoint(checkpoint, model=model)
    say(evaluation_banner(cfg, data, model, info))
    stats = _evaluate(cfg, model, data, info, checkpoint["epoch"])
    _write_jsonl(cfg.output_dir / "metrics.jsonl", {"epoch": checkpoint["epoch"], "eval": stats})
    _pictures(cfg, model, data, info)
    return stats


def fit(cfg: RunConfig, *, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (and evaluate every ``eval_every`` epochs) as `cfg` says, or continue the run it resumes
    (`checkpoint`: the ``resumed_from`` checkpoint when the caller has read it already).

    Returns:
        The last evaluation's stats (``{}`` if none ran).

    Raises:
        :class:`~.interrupt.TrainingInterrupted` after saving a checkpoint when stopped by Ctrl-C / SIGTERM.
    """
    keep_freed_host_memory()  # the steps' large tensors reuse memory instead of faulting in new pages
    info = init_distributed(cfg.device)
    cfg = prepare_output_dir(cfg)
    seed_everything(cfg.seed + info.rank)
    if checkpoint is None and cfg.resumed_from is not None:
        checkpoint = read_checkpoint(cfg.resumed_from)
    data = load_data(cfg, train=True)
    trainer = _Trainer(cfg, data, info)
    trainer.restore(checkpoint)
    trainer.announce()
    return trainer.run()


class _Trainer:
    """The state of a training run and the steps of its loop."""

    def __init__(self, cfg: RunConfig, data: RunData, info: DistInfo) -> None:
        self.cfg, self.data, self.info = cfg, data, info
        assert data.train is not None
        model = build_run_model(cfg, data.val.num_classes, info.device)
        self.record = model_record(cfg, data)
        self.loader = make_train_loader(cfg, data.train, info.device)
        self.iters_per_epoch = min(len(self.loader), cfg.max_iters or len(self.loader))
        self.groups = param_groups(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, decoder_lr_mult=cfg.decoder_lr_mult,
            decoder_wd_mult=cfg.decoder_wd_mult, no_decay_norm_bias=cfg.no_decay_norm_bias,
        )  # fmt: skip
        self.optimizer = adamw(self.groups, lr=cfg.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_schedule(), self.iters_per_epoch)
        self.base_lrs = list(self.scheduler.base_lrs)
        self.scaler = make_grad_scaler(info.device, cfg.amp)
        self.model = wrap_ddp(model, info, find_unused_parameters=cfg.find_unused_parameters)
        if info.world_size > 1 and (norms := per_process_batch_norms(model)):
            say(
                f"note: {norms} BatchNorm layers normalise over each process's batch of {cfg.batch_size} "
                f"images, not the total {cfg.batch_size * info.world_size}: their statistics are per process"
            )
        self.epoch, self.iteration, self.closed = 0, 0, True
        self.meter, self.best_ap, self.stats = EpochMeter(), None, {}
        self.metrics = cfg.output_dir / "metrics.jsonl"
        self.steps = StepLog(cfg.output_dir / "steps.jsonl" if cfg.log_steps else None)
        self.stop = StopRequest()

    # ----------------------------------------------------------------------------------------------------
    def restore(self, checkpoint: dict[str, Any] | None) -> None:
        """Load a resumed run's state and position; restore the random generators last."""
        if checkpoint is None:
            return
        load_checkpoint(
            checkpoint,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
        )
        progress = checkpoint.get("progress") or {
            "epoch": checkpoint["epoch"],
            "iteration": self.iters_per_epoch,
        }
        saved_per_epoch = progress.get("iters_per_epoch", self.iters_per_epoch)
        at_epoch_end = progress["iteration"] >= saved_per_epoch
        saved_world = progress.get("world_size", 1)
        resplit = saved_per_epoch != self.iters_per_epoch
        if not at_epoch_end and (resplit or saved_world != self.info.world_size):
            raise RunConfigError(
                f"{self.cfg.resumed_from} was saved mid-epoch by {saved_world} process(es); resume it with as "
                f"many (this run has {self.info.world_size}), or from an epoch's end"
            )
        self.epoch = progress["epoch"]
        self.iteration = self.iters_per_epoch if at_epoch_end else progress["iteration"]
        self.closed = progress.get("closed", True)
        self.meter = EpochMeter(**progress["meter"]) if "meter" in progress else EpochMeter()
        self.best_ap = progress.get("best_ap")
        # The best AP to beat is one this folder's checkpoint_best.pth holds, scored as this run scores: a
        # branch copied into a folder of its own has none yet, and new test-time settings score otherwise.
        rescored = {"deq_steps", "deq_tol", "deq_solver"} & set(self.cfg.changed)
        if self.best_ap is not None and (rescored or not (self.cfg.output_dir / BEST).is_file()):
            why = f"{', '.join(sorted(rescored))} changed" if rescored else f"no {BEST} in this folder"
            say(f"note: {BEST} starts again at the next evaluation ({why})")
            self.best_ap = None
        if is_main_process():
            self._rewind_logs(at_epoch_end)
        if resplit:
            # Another number of processes splits an epoch into other iterations: the schedule's position is
            # this epoch's end counted in this run's iterations, so the drops still fall on epochs.
            self.scheduler.last_epoch = (self.epoch + 1) * self.iters_per_epoch
        if resplit or {"lr", "epochs", "drops", "warmup_iters"} & set(self.cfg.changed):
            retarget_scheduler(self.scheduler, self.cfg.lr_schedule(), self.iters_per_epoch, self.base_lrs)
        rng = checkpoint.get("rng")
        if isinstance(rng, list) and len(rng) == self.info.world_size:
            set_rng_state(rng[get_rank()])
        elif isinstance(rng, dict) and self.info.world_size == 1:
            set_rng_state(rng)
        else:
            say(
                "note: the random state was saved by another number of processes; re-seeded for the next "
                f"epoch, {self.epoch + 1}"
            )
            seed_everything(self.cfg.seed + self.info.rank + 1000 * (self.epoch + 1))

    def _rewind_logs(self, at_epoch_end: bool) -> None:
        """Drop what the logs hold past the checkpoint's position: written after it and before the run stopped
        (a crash, a second Ctrl-C while saving), it would be logged twice as the run trains on from there."""
        epoch, done, closed = self.epoch, self.iteration, self.closed

        def before_metrics(record: Mapping[str, Any]) -> bool:  # eval-only records are not the training's
            return "train" not in record or record["epoch"] < epoch or (record["epoch"] == epoch and closed)

        def before_steps(record: Mapping[str, Any]) -> bool:
            return record["epoch"] < epoch or (
                record["epoch"] == epoch and (at_epoch_end or record["iteration"] < done)
            )

        dropped = rewind_jsonl(self.metrics, before_metrics)
        dropped += rewind_jsonl(self.cfg.output_dir / "steps.jsonl", before_steps)
        if dropped:
            say(
                f"note: dropped {dropped} log records past the checkpoint's position (written before the run stopped)"
            )

    def announce(self) -> None:
        """Print the settings in force and write ``config.json``."""
        say(training_banner(self.cfg, self.data, self.model, self.info, self._position()))
        finished = (
            self.closed and self.iteration >= self.iters_per_epoch and self.epoch + 1 >= self.cfg.epochs
        )
        if finished and self.cfg.changed:  # nothing will train: what was changed takes no effect
            say(f"note: the run has finished, so {', '.join(self.cfg.changed)} given again change nothing")
        elif is_main_process():
            config = {"model": self.record, "args": self.cfg.to_dict()}
            (self.cfg.output_dir / "config.json").write_text(json.dumps(config, indent=2))

    def _position(self) -> RunPosition:
        return RunPosition(self.groups, self.base_lrs, self.iters_per_epoch, self.epoch, self.iteration)

    # ----------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        with self.stop:
            if self.iteration >= self.iters_per_epoch:  # resumed at an epoch's end
                self._end_epoch(self.epoch, resumed=True)
                self.epoch, self.iteration, self.meter = self.epoch + 1, 0, EpochMeter()
            if self.epoch >= self.cfg.epochs:
                say(
                    f"{self.cfg.output_dir} has finished its {self.cfg.epochs} epochs: nothing to train. Pass "
                    f"--epochs N (above {self.cfg.epochs}) to train it longer, or evaluate it with eval"
                )
            for epoch in range(self.epoch, self.cfg.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
                self.iteration, self.meter = 0, EpochMeter()
        say(f"training done in {time.perf_counter() - start:.1f}s; outputs in {self.cfg.output_dir}")
        _pictures(self.cfg, unwrap(self.model), self.data, self.info)
        return self.stats

    def _train_epoch(self, epoch: int) -> None:
        self.epoch, self.closed = epoch, False
        self.loader.batch_sampler.set_epoch(epoch, start=self.iteration, stop=self.iters_per_epoch)  # type: ignore[union-attr]
        train_one_epoch(
            self.model, self.loader, self.optimizer, device=self.info.device, epoch=epoch,
            scheduler=self.scheduler, amp=self.cfg.amp, scaler=self.scaler, clip_max_norm=self.cfg.clip_max_norm,
            max_iters=self.iters_per_epoch, print_freq=self.cfg.print_freq, log=tqdm.write,
            branchwise=not self.cfg.one_graph_backward, start=self.iteration, meter=self.meter,
            stop_vote=self._stop_asked, on_step=self._after_step, progress=True,
        )  # fmt: skip

    def _after_step(self, i: int, result: StepResult) -> None:
        """The run's work after iteration `i`: the step log, the mid-epoch checkpoint, a requested stop."""
        epoch, self.iteration = self.epoch, i + 1
        # A step the float16 GradScaler skipped has no finite norm: null, as JSON has no Infinity.
        grad_norm = result.grad_norm if math.isfinite(result.grad_norm) else None
        self.steps.write(
            {"epoch": epoch, "iteration": i, "lr": result.lr, "grad_norm": grad_norm, **result.losses}
        )
        # Several processes stop together on the vote the step carried (a request during this step is voted on
        # in the next); one process stops as soon as the step that was running when asked is done.
        if result.stop or (self.info.world_size == 1 and self.stop.requested):
            self._interrupted(self._save())
        step = epoch * self.iters_per_epoch + i + 1
        if (
            self.cfg.checkpoint_every
            and step % self.cfg.checkpoint_every == 0
            and i + 1 < self.iters_per_epoch
        ):
            path = self._save()
            if is_main_process():
                tqdm.write(f"checkpoint at epoch {epoch} iteration {i + 1}: {path}")
        self.stop.after_iteration(epoch, i, self.info.rank)

    def _end_epoch(self, epoch: int, *, resumed: bool = False) -> None:
        """The epoch's summary, checkpoint, evaluation (when due) and metrics record, in an order that
        loses nothing if the run stops half-way: the checkpoint before an evaluation records that it is
        still to run, and a resumed run runs it first."""
        cfg = self.cfg
        train_stats = self.meter.stats(self.optimizer.param_groups[0]["lr"])
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if resumed and self.closed:
            return  # this epoch's record was written before its checkpoint
        if not resumed:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in headline(train_stats).items())
            say(f"epoch {epoch} done in {train_stats['time_s']:.1f}s: {shown}")
        record: dict[str, Any] = {"epoch": epoch, "train": train_stats}
        if due:
            if not resumed:
                self._save()  # still open: a resumed run evaluates first
            self._stop_if_requested()
            try:
                self.stats = _evaluate(
                    cfg, self.model, self.data, self.info, epoch, should_stop=self._stop_asked
                )
            except EvaluationStopped:
                self._interrupted(cfg.output_dir / LAST)
            record["eval"] = self.stats
        improved = due and (self.best_ap is None or self.stats["AP"] > self.best_ap)
        if improved:
            self.best_ap = self.stats["AP"]
        self.closed = True
        _write_jsonl(self.metrics, record)
        last = self._save()
        if is_main_process():
            if improved:
                copy_checkpoint(last, cfg.output_dir / BEST)
            if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0:
                copy_checkpoint(last, cfg.output_dir / f"checkpoint_epoch{epoch}.pth")
            records = [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
            plot_training_curves(records, cfg.output_dir / "training_curves.png")
        self._stop_if_requested()

    def _stop_asked(self) -> bool:
        return self.stop.requested

    def _stop_if_requested(self) -> None:
        if any_process(self.stop.requested):
            self._interrupted(self.cfg.output_dir / LAST)

    def _save(self) -> Path:
        """Write ``checkpoint_last.pth`` at the current position (every process calls it: each one's random
        state goes in)."""
        rngs = gather_object(rng_state())
        progress = {
            "epoch": self.epoch, "iteration": self.iteration, "iters_per_epoch": self.iters_per_epoch,
            "closed": self.closed, "meter": self.meter.state(), "best_ap": self.best_ap,
            "world_size": self.info.world_size,
        }  # fmt: skip
        path = self.cfg.output_dir / LAST
        save_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, epoch=self.epoch,
            config=self.record, args=self.cfg.to_dict(), scaler=self.scaler,
            extra={"progress": progress, "rng": rngs},
        )  # fmt: skip
        return path

    def _interrupted(self, path: Path) -> None:
        where = f"epoch {self.epoch}, iteration {self.iteration}/{self.iters_per_epoch}"
        raise TrainingInterrupted(f"stopped at {where}; checkpoint saved to {path}", path)


def _pictures(cfg: RunConfig, model: nn.Module, data: RunData, info: DistInfo) -> None:
    """What a person looks at after a run: the refinement curve and val predictions beside ground truth."""
    model = unwrap(model)
    if cfg.refinement_curve:
        say(f"refinement curve: AP after 0..{cfg.refinement_curve} test-time steps")
        loader = _val_loader(cfg, data, info)
        curve = refinement_curve(
            model, loader, data.val.coco, max_steps=cfg.refinement_curve, device=info.device,
            label_to_category_id=data.val.label_to_category_id, amp=cfg.amp,
        )  # fmt: skip
        say("  ".join(f"{p['steps']}: {p['AP']:.3f}" for p in curve))
        if is_main_process():
            json_path, png = save_refinement_curve(curve, cfg.output_dir, train_depth=training_depth(model))
            say(f"refinement curve saved to {png} and {json_path}")
    if cfg.save_predictions and is_main_process():
        detector = Detector(
            model.eval(), cfg.image_size, cfg.max_size, list(data.val.category_names), info.device
        )
        grid = save_prediction_grid(
            detector,
            data.val.coco,
            data.paths.val_images,
            cfg.output_dir / "predictions.png",
            count=cfg.save_predictions,
        )
        say(f"predictions (ground truth left, model right) saved to {grid}")
