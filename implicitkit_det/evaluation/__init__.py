"""Turning model outputs into COCO results and scoring them."""

from .coco_evaluator import STAT_NAMES, CocoEvaluator, format_summary
from .postprocess import PostProcess, to_coco_results

__all__ = ["STAT_NAMES", "CocoEvaluator", "PostProcess", "format_summary", "to_coco_results"]
