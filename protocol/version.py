"""batchwire's own version, as installed (``batchwire --version``, ``/info``, the OpenAPI
document)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("batchwire")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "0.0.0+source"
