"""Standard library modules the daemon's dependencies import but do not use: loaded only if something uses them.

paho-mqtt imports `urllib.request` for its proxy support (the bridge connects its own socket, so paho never asks
for a proxy), and websockets imports `importlib.metadata` for a version lookup it makes only in development
checkouts. With what they pull in (`http.client`, `email.*`, `zipfile`, `csv`, ...) that is ~2 MB of resident
memory for the daemon's whole life (docs/performance.md). Importing this module, before those dependencies,
puts a placeholder in `sys.modules` for each: `import` binds it as usual, and the first attribute anyone reads
from it imports the real module and copies its namespace into the placeholder, so code that uses them still
works (tests/protocol/test_import_footprint.py checks both).

`email.utils` too: `cryptography.x509` binds its `parseaddr` at import (see LAZY_FUNCTIONS). And `uuid` (with its C
part `_uuid`, ~0.13 MB): paho uses it only to make up a client id, and the bridge always gives one. A module already
imported is left alone. `agw` (gateway/cli.py, the daemon's entry point) and the daemon (gateway/daemon.py) import
this first.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

DEFERRED = ("urllib.request", "importlib.metadata", "email.utils", "uuid")
# Functions a dependency binds with `from <module> import <name>` when it is imported (which would read the
# attribute, i.e. import the module): each gets a stand-in that imports the module on its first call.
# `cryptography.x509.general_name` binds `email.utils.parseaddr` (used to build an RFC 822 general name, which
# the daemon never does); `email.utils` brings `email.charset`, `email.encoders`, `quopri`, `calendar`, ...
LAZY_FUNCTIONS: dict[str, tuple[str, ...]] = {"email.utils": ("parseaddr",)}

_lock = threading.RLock()


class DeferredModule(types.ModuleType):
    """A stand-in for a module not imported yet; reading an attribute it lacks imports the real one."""

    def __getattr__(self, attr: str) -> Any:
        # Dunder probes (copy, pickle, doctest, ...) import nothing; `__path__` does: the import system reads it to
        # import a submodule or `from <package> import <name>`, which need the real package.
        if attr.startswith("__") and attr.endswith("__") and attr != "__path__":
            raise AttributeError(attr)
        if attr == "__path__" and self.__spec__.submodule_search_locations is None:
            raise AttributeError(attr)  # not a package (`from <module> import <name>` probes it)
        return getattr(_load(self), attr)


def _load(placeholder: DeferredModule) -> types.ModuleType:
    name = placeholder.__name__
    with _lock:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
            try:
                real = importlib.import_module(name)  # sets the parent package's attribute to the real module
            except BaseException:
                sys.modules[name] = placeholder
                raise
            placeholder.__dict__.update({k: v for k, v in vars(real).items() if k != "__class__"})
        return sys.modules[name]


def _lazy_function(placeholder: DeferredModule, attr: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_load(placeholder), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"{placeholder.__name__}.{attr}, imported on the first call"
    return call


def install() -> None:
    """Put a placeholder for each of DEFERRED that is not imported yet (a submodule's parent package is imported)."""
    with _lock:
        for name in DEFERRED:
            if name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None:
                continue
            placeholder = DeferredModule(name)
            placeholder.__spec__ = spec
            placeholder.__file__ = spec.origin
            for attr in LAZY_FUNCTIONS.get(name, ()):
                setattr(placeholder, attr, _lazy_function(placeholder, attr))
            parent, _, child = name.rpartition(".")
            sys.modules[name] = placeholder
            if parent:
                setattr(sys.modules[parent], child, placeholder)


install()
