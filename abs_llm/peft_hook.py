"""Install the switchable LoRA dispatch (:func:`abs_llm.peft_lora.install`) as soon as peft is imported.

``import peft`` takes seconds, so ``import abs_llm`` does not import it. If peft is already imported, the dispatch is
installed now; otherwise a one-shot import hook runs it right after the ``peft`` package finishes importing (the
usual post-import-hook pattern: wrap the loader's ``exec_module``). A peft release that moved the hook gets one
warning, never a broken ``import peft``.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings


def _install() -> None:
    try:
        from . import peft_lora

        peft_lora.install()
    except Exception as e:  # noqa: BLE001  (a peft that moved its hook must not break `import peft`)
        warnings.warn(f"abs_llm could not hook into peft ({type(e).__name__}: {e}); plain peft.get_peft_model will not"
                      " know SwitchableLinear layers. Use abs_llm.peft_lora.get_peft_model, or a tested peft version.")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        spec = None
        for finder in sys.meta_path:  # whichever finder would have found peft (site-packages, editable installs, ...)
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_and_install(module):
            exec_module(module)
            _remove()
            _install()

        spec.loader.exec_module = exec_and_install
        return spec


_FINDER = _Finder()


def _remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install_when_imported() -> None:
    """Install now if peft is imported, else when it is (idempotent)."""
    if "peft" in sys.modules:
        _install()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
