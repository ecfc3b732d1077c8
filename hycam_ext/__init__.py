"""hycam_ext: fast HyCAM (Hybrid Contextual Attention Modulation) for PyTorch."""
from ._version import __version__
from . import _extension  # checks the binary against the running torch first (ImportError if not)
from ._extension import KernelsUnavailableError
from .config import HyCAMConfig, Placement
from .modules import HyCAM, HyCAMAttention, hycam_param_groups, load_balancing_loss, route
from .diagnostics import routing_diagnostics
from .convert import convert_official_state_dict
from . import ops, reference
from .reference import ReferenceHyCAM

__all__ = ["HyCAMConfig", "Placement", "HyCAM", "HyCAMAttention", "ReferenceHyCAM", "load_balancing_loss",
           "convert_official_state_dict", "route", "hycam_param_groups", "routing_diagnostics",
           "ops", "reference", "KernelsUnavailableError",
           "__version__"]
