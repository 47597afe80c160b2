"""vtprune: edge deployment and export toolchain for VLMs with training-free visual-token pruning.

Importing the package is cheap: it pulls in no torch, transformers, onnxruntime or tensorrt.
"""

__version__ = "0.1.0"

from vtprune.config import PruneConfig  # noqa: E402  (pure dataclass, no heavy imports)
from vtprune.errors import VtpruneError  # noqa: E402

__all__ = ["PruneConfig", "VtpruneError", "__version__"]
