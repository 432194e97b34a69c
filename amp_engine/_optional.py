"""Optional packages: ``import amp_engine`` needs torch alone.

numpy, tqdm and matplotlib serve the demo, the benchmarks' plots and progress
bars (the ``demo`` extra); triton the Triton backend. A feature that needs one
imports it here, at the point of use, so a machine without it (the GPU machine has
no network and none of them preinstalled) loses that feature only, with an error
that names the package and the command that installs it.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: package -> the extra of amp_engine that installs it
EXTRAS = {"numpy": "demo", "tqdm": "demo", "matplotlib": "demo", "hypothesis": "test",
          "pytest": "test"}


def available(package: str) -> bool:
    """True if `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import `module` for `feature`, or raise ImportError naming the package and its extra."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != package:
            raise  # the package is there but something it imports is not: not ours to rename
        extra = EXTRAS.get(package)
        how = (f"pip install 'amp_engine[{extra}]' (or pip install {package})" if extra
               else f"pip install {package}")
        raise ImportError(f"{feature} needs the optional package {package!r}, which is not "
                          f"installed; install it with: {how}") from exc


class NoBar:
    """The part of tqdm's interface our loops use, showing nothing: what runs when
    no bar is shown, so tqdm is needed only for a bar that is."""

    def __init__(self, iterable=None, **_: object) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def __enter__(self) -> "NoBar":
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def set_postfix(self, *_: object, **__: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
