"""pytest plugin of the GPU run (``-p bench.gpu_pytest``): keeps the tests parametrised on one
device and appends each test's outcome to a JSON-lines file as soon as it is known, so a test
session cut off by its cap still leaves every result it reached. Environment (pytest-xdist
workers see the same): FASTSSL_TESTS_DEVICE ("cuda" or "cpu": a ``device``/``dev`` parameter of
that type, or the ``gpu`` marker for cuda), FASTSSL_TESTS_BACKENDS (optional comma-separated
``backend`` values to keep), FASTSSL_TESTS_LOG (the file). A file that fails to collect is one
"error" record (when "collect"; run with --continue-on-collection-errors).
"""
from __future__ import annotations

import json
import os
import time

import pytest


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {}) or {}


def item_device(item) -> str | None:
    params = _params(item)
    for key in ("device", "dev"):
        if key in params:
            return getattr(params[key], "type", None) or str(params[key]).split(":")[0]
    return "cuda" if item.get_closest_marker("gpu") is not None else None


def selected(item, device: str, backends: set[str] | None) -> bool:
    backend = _params(item).get("backend")
    return item_device(item) == device and (backends is None or backend is None
                                            or str(backend) in backends)


def pytest_collection_modifyitems(config, items):
    device = os.environ.get("FASTSSL_TESTS_DEVICE")
    if not device:
        return
    names = os.environ.get("FASTSSL_TESTS_BACKENDS", "")
    backends = {b.strip() for b in names.split(",") if b.strip()} or None
    keep = [item for item in items if selected(item, device, backends)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _write(report, outcome: str, when: str) -> None:
    path = os.environ.get("FASTSSL_TESTS_LOG")
    # Under pytest-xdist each report reaches the hooks twice, in the worker and in the
    # controller: only the controller writes.
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.skipped:
        rep = report.longrepr
        message = str(rep[2]) if isinstance(rep, tuple) else str(rep or "")
    elif report.failed:
        text = (getattr(report, "longreprtext", "") or str(report.longrepr or "")).strip()
        errors = [ln for ln in text.splitlines() if ln.startswith("E ")]
        message = "\n".join(errors[-6:]) or text[-600:]
    else:
        message = ""
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": outcome, "when": when,
                            "duration_s": round(getattr(report, "duration", 0.0), 4),
                            "message": message[:1200], "time": time.time()}) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    # One record per test: the call phase, or setup/teardown when they fail or skip.
    if report.when == "call" or (report.when in ("setup", "teardown") and not report.passed
                                 and not (report.when == "teardown" and report.skipped)):
        _write(report, "error" if report.when != "call" and report.failed else report.outcome,
               report.when)


def pytest_collectreport(report):
    # Under xdist the controller gets each failed or skipped collection once (deduplicated).
    if not report.passed:
        _write(report, "error" if report.failed else "skipped", "collect")
