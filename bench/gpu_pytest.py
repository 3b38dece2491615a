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


def item_device(item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {}) or {}
    for key in ("device", "dev"):
        if key in params:
            value = params[key]
            return getattr(value, "type", None) or str(value).split(":")[0]
    if item.get_closest_marker("gpu") is not None:
        return "cuda"
    return None


def item_backend(item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {}) or {}
    value = params.get("backend")
    return None if value is None else str(value)


def selected(item, device: str, backends: set[str] | None) -> bool:
    if item_device(item) != device:
        return False
    backend = item_backend(item)
    return backends is None or backend is None or backend in backends


def pytest_collection_modifyitems(config, items):
    device = os.environ.get("FASTSSL_TESTS_DEVICE")
    if not device:
        return
    names = os.environ.get("FASTSSL_TESTS_BACKENDS", "").strip()
    backends = {b.strip() for b in names.split(",") if b.strip()} or None
    keep, drop = [], []
    for item in items:
        (keep if selected(item, device, backends) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _write(record: dict) -> None:
    path = os.environ.get("FASTSSL_TESTS_LOG")
    # Under pytest-xdist each report reaches this hook twice, in the worker and in the
    # controller: only the controller writes.
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    # One record per test: the call phase, or setup/teardown when they fail or skip.
    if report.when == "call" or (report.when in ("setup", "teardown") and not report.passed):
        if report.when == "teardown" and report.skipped:
            return
        outcome = report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif not report.passed:
            message = (getattr(report, "longreprtext", "") or str(report.longrepr or "")).strip()
            lines = [ln for ln in message.splitlines() if ln.startswith("E ")]
            message = "\n".join(lines[-6:]) or message[-600:]
        _write({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                "duration_s": round(report.duration, 4), "message": message[:1200], "time": time.time()})


def pytest_collectreport(report):
    # Under xdist the controller gets each failed or skipped collection once (deduplicated).
    if report.passed:
        return
    if report.failed:
        text = (getattr(report, "longreprtext", "") or str(report.longrepr or "")).strip()
        lines = [ln for ln in text.splitlines() if ln.startswith("E ")]
        message = "\n".join(lines[-6:]) or text[-600:]
        outcome = "error"
    else:
        longrepr = report.longrepr
        message = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr or "")
        outcome = "skipped"
    _write({"nodeid": report.nodeid, "outcome": outcome, "when": "collect", "duration_s": 0.0,
            "message": message[:1200], "time": time.time()})
