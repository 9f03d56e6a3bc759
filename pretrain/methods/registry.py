"""The method registry: ``@register_method(name, ConfigClass)`` on a ``Method`` subclass.

Registration is the only place a method's name, its config section and its backbone needs are
written, so the config's ``method.*`` sections, the list of known methods and the builder cannot
drift apart (timm's ``register_model`` idea). A method registered anywhere (a test file, a user's
plugin module imported before ``load_config``) is a first-class method: it gets its own
``method.<name>`` config section and trains through the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selfsup.pretrain.methods.base import Method

BACKBONE_KINDS = ("any", "resnet", "vit")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    cls: type[Method]
    config: type  # dataclass of the method's ``method.<name>`` section
    backbone: str = "any"  # any | resnet | vit: what the method's heads/decoder need
    description: str = ""


METHODS: dict[str, MethodEntry] = {}


def register_method(
    name: str, config: type, *, backbone: str = "any", description: str = ""
) -> Callable[[type[Method]], type[Method]]:
    """Class decorator adding a method under ``name`` with its config dataclass."""
    if backbone not in BACKBONE_KINDS:
        raise ValueError(f"register_method({name!r}): backbone must be one of {BACKBONE_KINDS}")

    def add(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, Method):
            raise TypeError(f"register_method({name!r}): {cls.__name__} is not a Method subclass")
        old = METHODS.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"method '{name}' is already registered by {old.cls.__module__}")
        cls.name = name
        doc = description or (cls.__doc__ or "").strip().split("\n")[0]
        METHODS[name] = MethodEntry(name, cls, config, backbone, doc)
        return cls

    return add


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def check_method_config(name: str, sub: Any) -> None:
    """The section's own checks (a ``check()`` method on its dataclass, if it has one)."""
    check = getattr(sub, "check", None)
    if callable(check):
        check()
