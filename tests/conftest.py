"""Shared test policy.

Tests marked ``kernel`` need root and working eBPF; ``docker`` ones a Docker
daemon; ``browser`` ones Debian's chromium.  Outside CI a machine that cannot
run them skips them with the reason.  Under ``CI=true`` (set by ``.ci/run``) a
skip of any of them is a failure: CI runs as root on the kernel we ship for, so
a skipped end-to-end test there means it silently stopped testing anything.
"""

from __future__ import annotations

import os

import pytest

# The browser fixtures (one chromium per session) are registered once, here:
# imported into two test modules, a session fixture would start twice.
pytest_plugins = ("tests.uihelpers",)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
STRICT_MARKERS = ("kernel", "docker", "browser")


def pytest_configure(config):
    # A built module shadows its .py: after an edit without a rebuild the
    # suite would test the old code and pass.  Missing builds are tested
    # apart (test_compiled.py): the Python alone is a supported way to run.
    from qtap_devtools import compiled

    old = compiled.stale()
    if old and not compiled.run_source_instead(os.environ):  # (QTAP_INTERPRETED=1 tests the source)
        raise pytest.UsageError(f"compiled modules older than their source: {', '.join(old)}; "
                                "rebuild with `make setup` (or run `make test`)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not IN_CI or not report.skipped:
        return
    if any(item.get_closest_marker(m) for m in STRICT_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run it: {reason}"


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (eBPF)"
    try:
        import bcc  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"bcc does not import: {exc}; fix: make setup"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _kernel_unavailable()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.skip(reason=reason))
