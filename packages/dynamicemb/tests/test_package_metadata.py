"""The installed distribution and the import agree on the package's identity."""

from importlib.metadata import version

import dynamicemb


def test_version_matches_installed_distribution() -> None:
    assert dynamicemb.__version__ == version("dynamicemb")


def test_all_names_resolve() -> None:
    for name in dynamicemb.__all__:
        assert hasattr(dynamicemb, name), name
