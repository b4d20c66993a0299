"""Matching predictions to targets and the set-prediction loss."""

from .criterion import SetCriterion
from .matcher import HungarianMatcher, focal_cost

__all__ = ["HungarianMatcher", "SetCriterion", "focal_cost"]
