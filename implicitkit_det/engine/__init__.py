"""Training and evaluation: whole runs (:func:`fit`, :func:`evaluate_checkpoint` from a :class:`RunConfig`),
the epoch loop, COCO evaluation, optimiser and schedule, checkpoints, the process group."""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .evaluate import evaluate, rescale_to_original
from .interrupt import TrainingInterrupted
from .optim import (
    RECIPES,
    SCHEDULES,
    OptimizerRecipe,
    Schedule,
    build_optimizer,
    build_scheduler,
    param_groups,
    recipe_for,
)
from .process_group import DistInfo, build_sampler, cleanup_distributed, init_distributed, unwrap, wrap_ddp
from .run import evaluate_checkpoint, fit
from .run_config import RunConfig, RunConfigError, build_run_config
from .train import (
    NonFiniteLossError,
    autocast,
    make_grad_scaler,
    train_one_epoch,
    train_step,
    trains_branchwise,
)

__all__ = [
    "RECIPES",
    "SCHEDULES",
    "DistInfo",
    "NonFiniteLossError",
    "OptimizerRecipe",
    "RunConfig",
    "RunConfigError",
    "Schedule",
    "TrainingInterrupted",
    "autocast",
    "build_optimizer",
    "build_run_config",
    "build_sampler",
    "build_scheduler",
    "cleanup_distributed",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "init_distributed",
    "load_checkpoint",
    "make_grad_scaler",
    "param_groups",
    "read_checkpoint",
    "recipe_for",
    "rescale_to_original",
    "save_checkpoint",
    "train_one_epoch",
    "train_step",
    "trains_branchwise",
    "unwrap",
    "wrap_ddp",
]
