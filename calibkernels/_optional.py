"""Optional dependencies: imported where they are used, with an error that names the extra of
calibkernels that installs them (setup.py's extras_require)."""

import importlib


def require(module: str, extra: str, what: str):
    """import module, or raise ImportError saying which `pip install 'calibkernels[extra]'`
    provides it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the package {module.split('.')[0]!r}: "
                          f"pip install 'calibkernels[{extra}]'") from None
