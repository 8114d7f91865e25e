"""python-pkcs11, imported without loading its `pkcs11.util` helpers until something uses them.

`pkcs11/__init__.py` imports `pkcs11.util.{dh,dsa,ec,rsa,x509}`, which import asn1crypto (with `decimal` and
`fractions`): ~1.7 MB of resident memory for the daemon's whole life, and the backend needs none of it to load
and use keys (`_der_octet_string` reads the EC point; only key generation encodes curve parameters). Those five
modules are registered as lazy modules (`importlib.util.LazyLoader`) before `pkcs11` is imported: they run on
their first attribute access, so `from pkcs11.util.ec import ...` still works anywhere (here: on the one PKCS#11
worker thread, in key generation). tests/protocol/test_import_footprint.py keeps asn1crypto out of start-up.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

_DEFERRED = ("dh", "dsa", "ec", "rsa", "x509")


def _defer_util() -> None:
    """Load `pkcs11.util` (its `__init__` is a small helper) with `dh`, `dsa`, `ec`, `rsa` and `x509` as lazy
    submodules, before `pkcs11` itself; nothing is done if pkcs11 is already imported (then they are loaded).

    They are set as attributes of `pkcs11.util` too: `from pkcs11.util import dh` in pkcs11's `__init__` then takes
    the attribute as it is, where the import system would look at the module's `__spec__` and so run it."""
    if "pkcs11" in sys.modules or "pkcs11.util" in sys.modules:
        return
    top = importlib.util.find_spec("pkcs11")  # finds the package without running its __init__
    if top is None or top.submodule_search_locations is None:
        return  # not installed: the import below raises as it would have
    spec = importlib.machinery.PathFinder.find_spec("pkcs11.util", list(top.submodule_search_locations))
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    util = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(util)
    for name in _DEFERRED:
        full = f"pkcs11.util.{name}"
        sub = importlib.machinery.PathFinder.find_spec(full, list(spec.submodule_search_locations))
        if sub is None or sub.loader is None:
            return  # a different layout: leave everything to pkcs11's own imports
        sub.loader = importlib.util.LazyLoader(sub.loader)
        module = importlib.util.module_from_spec(sub)
        sub.loader.exec_module(module)  # lazy: runs the module's code on its first attribute access
        sys.modules[full] = module
        setattr(util, name, module)
    sys.modules["pkcs11.util"] = util


_defer_util()

import pkcs11  # noqa: E402 - after _defer_util, which must run first
import pkcs11.exceptions as p11e  # noqa: E402
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass  # noqa: E402

if not hasattr(pkcs11, "util"):  # what importing pkcs11.util the usual way would have set
    pkcs11.util = sys.modules["pkcs11.util"]

__all__ = ["Attribute", "KeyType", "Mechanism", "ObjectClass", "p11e", "pkcs11"]
