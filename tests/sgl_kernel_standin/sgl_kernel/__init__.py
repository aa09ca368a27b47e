"""Stand-in for the ``sgl_kernel`` package, for SGLang processes on machines without its CUDA build.

Why it exists: SGLang 0.5.23 imports names from ``sgl_kernel`` (the sglang-kernel wheel) at start-up,
even on its CPU engine. On PyPI that wheel holds CUDA code only, so on a CPU-only machine (CI, the
development machines) the import fails; on the GPU test machine it cannot be installed at all
(torch there is 2.11, the wheel needs 2.14). m3serve's layers use torch/Triton ops of their own, so
no sgl_kernel op is needed to serve; this package answers every import — any name, any submodule
(``sgl_kernel.quantization``), any attribute chain (``scalar_types.uint4b8``) — with a placeholder
that raises NotImplementedError naming the op if it is ever called. A test that reaches one has
found a code path that must not depend on sgl_kernel.

It is put first on PYTHONPATH of the SGLang server process only (m3serve.launch does that), never
on the test process's own path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.4.10"


class _Missing:
    """A placeholder for an sgl_kernel op or object: attributes chain, calls raise."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self._name} is an sgl_kernel op; this process runs with m3serve's stand-in "
            "sgl_kernel (no CUDA build here). The calling code path must use torch ops instead."
        )

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in {self._name}>"


def _module_getattr(modname: str):
    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Missing(f"{modname}.{name}")

    return __getattr__


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers ``import sgl_kernel.<anything>`` with a placeholder package."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []
        mod.__getattr__ = _module_getattr(spec.name)  # type: ignore[method-assign]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        return None


sys.meta_path.insert(0, _StandinFinder())
__getattr__ = _module_getattr("sgl_kernel")
