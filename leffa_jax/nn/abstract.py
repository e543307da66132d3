"""Build an NNX module with abstract (shape-only) parameters, fast.

`nnx.eval_shape(factory)` traces every parameter initialiser. Each RNG draw stores a traced
counter in a Variable, and Variable.set_value asks the tracer for `.sharding`; a tracer answers
with an AttributeError whose message (`_origin_msg`) walks the whole traced program so far, so the
cost grows quadratically with the number of parameters (measured here, 2 cores: the SD1.5 UNet
17.4 s -> 3.6 s, the tiny test UNet 3.8 s -> 1.0 s with the message skipped). `abstract_init`
skips building that message, which nobody reads (getattr(..., None) swallows the error), while it
traces; everything else is `nnx.eval_shape`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_tracer_errors():
    """Within the block, tracer attribute errors carry no origin message (JAX-internal; a JAX
    without the method is left alone)."""
    try:
        from jax._src.interpreters import partial_eval as pe
        cls = pe.DynamicJaxprTracer
        original = cls.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    with _LOCK:
        cls._origin_msg = lambda self: ""
        try:
            yield
        finally:
            cls._origin_msg = original


def abstract_init(factory: Callable[[], T]) -> T:
    """`nnx.eval_shape(factory)`: the module `factory()` builds, with ShapeDtypeStruct leaves."""
    from flax import nnx

    with _quiet_tracer_errors():
        return nnx.eval_shape(factory)
