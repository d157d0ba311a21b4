"""sacpo-lightning: SACPO safe alignment of language models with PyTorch Lightning."""

__version__ = "0.1.0"


def _map_checkout_callbacks() -> None:
    """Makes the top-level ``callbacks/`` folder importable as ``sacpo_lightning.callbacks`` from a source checkout.

    An install (wheel or editable) maps it through ``pyproject.toml``'s ``package-dir``; a checkout used through
    ``PYTHONPATH`` has no such mapping, so a finder for that one name is added, pointing at the same files.
    """
    import importlib.abc
    import importlib.util
    import os
    import sys

    name = f"{__name__}.callbacks"
    if importlib.util.find_spec(name) is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "callbacks")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return

    class _CheckoutCallbacks(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == name:
                return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
            return None

    sys.meta_path.append(_CheckoutCallbacks())


_map_checkout_callbacks()
