"""routertune: Router-Tuning with MindSkip for Hugging Face decoder models."""

from routertune.routing.cache import RoutedCache
from .config import RouterConfig
from routertune.routing.inject import add_routers, remove_routers
from .model import RoutedModel
from routertune.routing.state import forced

__all__ = ["RoutedModel", "RouterConfig", "RoutedCache", "add_routers", "remove_routers", "forced"]
__version__ = "0.1.0"
