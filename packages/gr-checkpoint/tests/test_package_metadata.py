"""The installed distribution and the import agree on the package's identity."""

from importlib.metadata import version

import gr_checkpoint


def test_version_matches_installed_distribution() -> None:
    assert gr_checkpoint.__version__ == version("gr-checkpoint")


def test_all_names_resolve() -> None:
    for name in gr_checkpoint.__all__:
        assert hasattr(gr_checkpoint, name), name
