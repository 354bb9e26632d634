"""A remote store's setup problems (a missing fsspec backend, no credentials) are one line; bugs stay tracebacks."""
from __future__ import annotations

import fsspec
import pytest

from tierprune.errors import TierpruneError
from tierprune.storage.remote import environment_error, probe


def test_a_missing_backend_package_is_named() -> None:
    fsspec.register_implementation("tierprune-missing", "tierprune_no_such_backend.FileSystem", clobber=True,
                                   errtxt="Install tierprune-no-such-backend to access tierprune-missing://")
    with pytest.raises(TierpruneError) as info:
        probe("tierprune-missing://bucket/folder", "--output tierprune-missing://bucket/folder")
    assert str(info.value) == ("--output tierprune-missing://bucket/folder: a store URL needs a package that is "
                               "not installed: Install tierprune-no-such-backend to access tierprune-missing://")
    with pytest.raises(ImportError) as raw:  # the classifier on its own, as the CLI's last resort uses it
        fsspec.core.url_to_fs("tierprune-missing://bucket/folder")
    assert environment_error(raw.value).startswith("a store URL needs a package that is not installed: ")


def test_cloud_sdk_errors_are_one_line_and_others_are_not() -> None:
    NoCredentialsError = type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})
    assert environment_error(NoCredentialsError("Unable to locate credentials\nmore")) == (
        "the store could not be reached: NoCredentialsError: Unable to locate credentials")
    Lookalike = type("Lookalike", (Exception,), {"__module__": "botocorex"})  # a prefix, not the package
    assert environment_error(Lookalike("x")) is None
    assert environment_error(ValueError("a bug of ours")) is None
    assert environment_error(ImportError("no module named tierprune_thing")) is None  # not raised by fsspec


def test_a_reachable_store_probes_silently() -> None:
    probe("memory://tierprune-probe/out", "--output memory://tierprune-probe/out")  # nothing raised or written
    assert not fsspec.filesystem("memory").exists("/tierprune-probe/out")
