"""The installed distribution and the import agree on the package's identity."""

from importlib.metadata import version

import hstu_attn


def test_version_matches_installed_distribution() -> None:
    assert hstu_attn.__version__ == version("hstu-attn")


def test_all_names_resolve() -> None:
    for name in hstu_attn.__all__:
        assert hasattr(hstu_attn, name), name
