"""Stand-in for torchvision so that timm imports beside the CPU torch (exploration only)."""
import importlib.abc, importlib.machinery, sys, types

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return "stub." + name
class _Dummy(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision stand-in")

class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Mod(spec.name); m.__path__ = []; return m
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Finder())
__path__ = []
__version__ = "0.0-stub"
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Dummy
