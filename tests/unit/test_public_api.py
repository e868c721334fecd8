"""The public surface is a tested list (as httpx does): `__all__` is sorted, complete and every name resolves."""

from __future__ import annotations

import types

import tasktree_dist

#: Module attributes that are not public API: the package's own submodules and typing helpers it imports.
NOT_EXPORTED = {"Any"}


def test_all_is_sorted_and_has_no_duplicates() -> None:
    assert tasktree_dist.__all__ == sorted(tasktree_dist.__all__)
    assert len(set(tasktree_dist.__all__)) == len(tasktree_dist.__all__)


def test_every_exported_name_resolves() -> None:
    missing = [name for name in tasktree_dist.__all__ if not hasattr(tasktree_dist, name)]
    assert not missing


def test_every_public_attribute_is_exported() -> None:
    public = {
        name for name, value in vars(tasktree_dist).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name not in NOT_EXPORTED
    }
    assert public <= set(tasktree_dist.__all__), sorted(public - set(tasktree_dist.__all__))


def test_names_loaded_on_first_use_are_the_packages_own() -> None:
    from tasktree_dist.distributed import CeleryExecutor, create_app
    from tasktree_dist.runs import RunClient

    assert tasktree_dist.CeleryExecutor is CeleryExecutor
    assert tasktree_dist.create_app is create_app
    assert tasktree_dist.RunClient is RunClient


def test_public_classes_say_what_they_are_for() -> None:
    undocumented = [
        name for name in tasktree_dist.__all__
        if isinstance(getattr(tasktree_dist, name), type) and not (getattr(tasktree_dist, name).__doc__ or "").strip()
    ]
    assert not undocumented
