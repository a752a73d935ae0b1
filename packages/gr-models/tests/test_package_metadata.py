"""The installed distribution and the import agree on the package's identity."""

from importlib.metadata import version

import gr_models


def test_version_matches_installed_distribution() -> None:
    assert gr_models.__version__ == version("gr-models")


def test_all_names_resolve() -> None:
    for name in gr_models.__all__:
        assert hasattr(gr_models, name), name
