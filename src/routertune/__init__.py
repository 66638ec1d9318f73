"""routertune: Router-Tuning with MindSkip for Hugging Face decoder models."""

from routertune.routing.cache import RoutedCache
from routertune.routing.inject import add_routers, remove_routers
from routertune.routing.state import forced

from .config import RouterConfig
from .model import RoutedModel

__all__ = ["RoutedModel", "RouterConfig", "RoutedCache", "add_routers", "remove_routers", "forced"]
__version__ = "0.1.0"
