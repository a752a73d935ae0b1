"""The installed distribution and the import agree on the package's identity."""

from importlib.metadata import version

import gr_parallel


def test_version_matches_installed_distribution() -> None:
    assert gr_parallel.__version__ == version("gr-parallel")


def test_all_names_resolve() -> None:
    for name in gr_parallel.__all__:
        assert hasattr(gr_parallel, name), name
