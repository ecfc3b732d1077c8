"""hycam_ext: fast HyCAM (Hybrid Contextual Attention Modulation) for PyTorch."""
from .config import HyCAMConfig
from .modules import HyCAM, HyCAMAttention, load_balancing_loss, route
from .convert import convert_official_state_dict
from . import ops, reference
from .reference import ReferenceHyCAM

__all__ = ["HyCAMConfig", "HyCAM", "HyCAMAttention", "ReferenceHyCAM", "load_balancing_loss",
           "convert_official_state_dict", "route", "ops", "reference"]
__version__ = "0.1.0"
