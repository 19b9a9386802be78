"""Self-supervised methods: one `Method` object each, found by name (`build_method(cfg)`)."""
from hpcbrain.methods import lsor as _lsor  # noqa: F401  (registers "lsor")
from hpcbrain.methods.base import (
    Method,
    available_methods,
    build_method,
    get_method_class,
    register_method,
)

__all__ = ["Method", "available_methods", "build_method", "get_method_class", "register_method"]
