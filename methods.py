"""The table of training methods: one entry per method, each a method_base.Method from its own room.

    import methods
    method = methods.get("irl")               # ConfigError naming the choices for an unknown name
    net = method.build_model(395, "resnet50")
    methods.names()                           # ('irl', 'agw', 'caj', 'deen', 'mmn', 'ifalnet') in table order

Adding a method: write its room (a Method subclass), add one entry below. `register` adds one at run time
(a plug-in, or a test's toy method) without editing this file.
"""
import method_agw
import method_deen
import method_ifalnet
import method_irl
import method_mmn
from utils import ConfigError

TABLE = {}


def register(method):
    """Add `method` (a method_base.Method instance) under its name; returns it. A name may be taken once."""
    if not method.name or method.name in TABLE:
        raise ConfigError(f"cannot register method {method.name!r}: empty or already registered")
    TABLE[method.name] = method
    return method


def unregister(name):
    """Remove a method added by `register` (tests clean up their toy methods with it)."""
    TABLE.pop(name, None)


def get(name):
    if name not in TABLE:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(TABLE)}")
    return TABLE[name]


def names():
    return tuple(TABLE)


for _method in (method_irl.IRLMethod(), method_agw.AGWMethod(), method_agw.CAJMethod(), method_deen.DEENMethod(),
                method_mmn.MMNMethod(), method_ifalnet.IFALNetMethod()):
    register(_method)
