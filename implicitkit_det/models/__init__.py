"""Query-based detectors: DEQDet (a deep-equilibrium decoder) and its explicit baseline AdaMixer, Sparse R-CNN
and its deep-equilibrium variant DEQ Sparse R-CNN.

``build_model(config_name, num_classes, **overrides)`` builds a named configuration (see
:data:`CONFIGS`); the parts are importable for custom assemblies.
"""

from .adamixer import AdaMixer
from .adamixer_stage import AdaMixerStage, refine_boxes
from .attention import IoFSelfAttention
from .backbone import FrozenStatsBatchNorm2d, ResNetBackbone, weights_cache_path
from .boxes import box_iof, position_encoding, xyxy_to_xyzr, xyzr_to_xyxy
from .configs import ModelConfig
from .delta_coder import DELTA_STDS, decode_deltas, encode_deltas
from .deq_sparse_rcnn import DEQSparseRCNN
from .deqdet import DEQDet
from .detector import BranchwiseLosses, Outputs, QueryDetector, RefinementStage
from .dynamic_conv import DynamicInteraction
from .fpn import FPN
from .mixing import AdaptiveMixing
from .neck import ChannelMapper
from .proposals import LearnedProposals, ProposalState
from .queries import InitialQueries, QueryState
from .rap import RAP, BoxPerturbation, CornerPerturbation, SparseRCNNRAP
from .registry import (
    ARCHITECTURES,
    CONFIGS,
    RECIPES,
    Architecture,
    DemoRecipe,
    OptimizerRecipe,
    architecture_of,
    build_model,
    register_detector,
)
from .roi import MultiLevelRoIAlign, roi_levels
from .sampling import AdaptiveSampling3D, sample_pyramid
from .sparse_rcnn import SparseRCNN
from .sparse_rcnn_stage import SparseRCNNStage

__all__ = [
    "ARCHITECTURES",
    "CONFIGS",
    "DELTA_STDS",
    "FPN",
    "RAP",
    "RECIPES",
    "AdaMixer",
    "AdaMixerStage",
    "AdaptiveMixing",
    "AdaptiveSampling3D",
    "Architecture",
    "BoxPerturbation",
    "BranchwiseLosses",
    "ChannelMapper",
    "CornerPerturbation",
    "DEQDet",
    "DEQSparseRCNN",
    "DemoRecipe",
    "DynamicInteraction",
    "FrozenStatsBatchNorm2d",
    "InitialQueries",
    "IoFSelfAttention",
    "LearnedProposals",
    "ModelConfig",
    "MultiLevelRoIAlign",
    "OptimizerRecipe",
    "Outputs",
    "ProposalState",
    "QueryDetector",
    "QueryState",
    "RefinementStage",
    "ResNetBackbone",
    "SparseRCNN",
    "SparseRCNNRAP",
    "SparseRCNNStage",
    "architecture_of",
    "box_iof",
    "build_model",
    "decode_deltas",
    "encode_deltas",
    "position_encoding",
    "refine_boxes",
    "register_detector",
    "roi_levels",
    "sample_pyramid",
    "weights_cache_path",
    "xyxy_to_xyzr",
    "xyzr_to_xyxy",
]
