"""Training and evaluation: the epoch loop, COCO evaluation, optimiser and schedule, checkpoints, DDP."""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .distributed import DistInfo, build_sampler, cleanup_distributed, init_distributed, unwrap, wrap_ddp
from .evaluate import evaluate, rescale_to_original
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
from .train import NonFiniteLossError, autocast, make_grad_scaler, train_one_epoch, trains_branchwise

__all__ = [
    "RECIPES",
    "SCHEDULES",
    "DistInfo",
    "NonFiniteLossError",
    "OptimizerRecipe",
    "Schedule",
    "autocast",
    "build_optimizer",
    "build_sampler",
    "build_scheduler",
    "cleanup_distributed",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "make_grad_scaler",
    "param_groups",
    "read_checkpoint",
    "recipe_for",
    "rescale_to_original",
    "save_checkpoint",
    "train_one_epoch",
    "trains_branchwise",
    "unwrap",
    "wrap_ddp",
]
