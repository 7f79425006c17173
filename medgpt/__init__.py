"""medgpt: train GPT-2-style models on medical text with Ray, gate them, serve the best one."""

from medgpt.errors import MedgptError

__version__ = "0.1.0"
__all__ = ["MedgptError", "__version__"]
