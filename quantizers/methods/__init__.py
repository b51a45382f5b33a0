"""Quantisation methods; each module registers itself with the registry on import.

Every module in this package is imported, so adding a method is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
