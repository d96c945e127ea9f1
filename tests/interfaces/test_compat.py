"""Old flat module paths keep importing for one release, as the new modules, with a warning."""

from __future__ import annotations

import importlib
import sys

import pytest

from unlearn_fast.compat import MOVED


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_path_gives_the_new_module_and_warns(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the import system's bookkeeping did not rename it


def test_from_import_of_an_old_path_still_works():
    sys.modules.pop("unlearn_fast.layers", None)
    with pytest.warns(DeprecationWarning):
        from unlearn_fast.layers import LayerConfig
    from unlearn_fast.model.layers import LayerConfig as new

    assert LayerConfig is new


def test_the_packages_that_replaced_modules_keep_their_public_names():
    from unlearn_fast.cli import main
    from unlearn_fast.fusion import DEFAULT_RHO, fuse_artifacts

    assert callable(main) and callable(fuse_artifacts) and DEFAULT_RHO > 0
