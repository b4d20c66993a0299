"""Query-based detectors: DEQDet (a deep-equilibrium decoder) and its explicit baseline AdaMixer.

``build_model(config_name, num_classes, **overrides)`` builds a named configuration (see
:data:`CONFIGS`); the parts are importable for custom assemblies.
"""

from .adamixer import AdaMixer
from .adamixer_stage import AdaMixerStage, refine_boxes
from .attention import IoFSelfAttention
from .backbone import ResNetBackbone
from .boxes import box_iof, position_encoding, xyxy_to_xyzr, xyzr_to_xyxy
from .configs import CONFIGS, ModelConfig, build_model
from .deqdet import DEQDet
from .detector import Outputs, QueryDetector
from .mixing import AdaptiveMixing
from .neck import ChannelMapper
from .queries import InitialQueries, QueryState
from .rap import RAP, BoxPerturbation
from .sampling import AdaptiveSampling3D, sample_pyramid

__all__ = [
    "CONFIGS",
    "RAP",
    "AdaMixer",
    "AdaMixerStage",
    "AdaptiveMixing",
    "AdaptiveSampling3D",
    "BoxPerturbation",
    "ChannelMapper",
    "DEQDet",
    "InitialQueries",
    "IoFSelfAttention",
    "ModelConfig",
    "Outputs",
    "QueryDetector",
    "QueryState",
    "ResNetBackbone",
    "box_iof",
    "build_model",
    "position_encoding",
    "refine_boxes",
    "sample_pyramid",
    "xyxy_to_xyzr",
    "xyzr_to_xyxy",
]
