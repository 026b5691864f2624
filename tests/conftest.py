"""Suite-wide pytest plumbing: the ``--run-slow`` switch and session fixtures over ``helpers/fixtures.py``.

Test modules live in one folder per part (``tests/formats/``, ``tests/remote/``, ...). Shared helpers
(``FIXTURES``, ``fixture_path``, ``materialize``, ``expected``, ``require_tool`` ..., the registry servers,
the ext4 tree reader) live in ``tests/helpers/`` so that plain functions and benchmarks can use them too;
import them as top-level modules: ``from fixtures import ...``, ``from registry_server import ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# tests/ is not a package: make the helper modules importable under any --import-mode.
_HELPERS = str(Path(__file__).resolve().parent / "helpers")
if _HELPERS not in sys.path:
    sys.path.insert(0, _HELPERS)

import fixtures  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked 'slow' (long soak and benchmark-like checks)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The repository's ``fixtures/`` directory."""
    return fixtures.FIXTURES


@pytest.fixture(scope="session")
def expected_index() -> dict[str, Any]:
    """``fixtures/expected.json``, parsed once per session."""
    return fixtures.expected()


@pytest.fixture(scope="session")
def materialized() -> Callable[[str], Path]:
    """``materialized(rel)`` → a plain file for fixture ``rel`` (``.bz2`` decompressed, members extracted).

    Results live in a content-addressed cache outside the repo (see ``fixtures.cache_dir``), shared by
    every test of the session and by later sessions.
    """
    return fixtures.materialize


@pytest.fixture(scope="session")
def assets():  # type: ignore[no-untyped-def]
    """The microVM kernel + initramfs (``frontends.run.vm.ensure_assets``), built once per machine."""
    from frontends.run.vm import ensure_assets

    fixtures.require_tool("qemu-system-x86_64")
    fixtures.require_tool("busybox")
    return ensure_assets(fixtures.vm_cache_dir())
