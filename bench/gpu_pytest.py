"""pytest plugin of the GPU run (``-p bench.gpu_pytest``): keeps the tests parametrised on
$FASTSSL_TESTS_DEVICE ("cuda" or "cpu": a ``device``/``dev`` parameter, or the ``gpu`` marker for
cuda) and the ``backend`` values in $FASTSSL_TESTS_BACKENDS (optional, comma-separated), and
appends each outcome to $FASTSSL_TESTS_LOG as soon as it is known, so a session cut off by its
cap keeps every result it reached; a file that fails to collect is one "error" record."""
from __future__ import annotations

import json
import os
import time

import pytest


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {}) or {}


def selected(item, device: str, backends: set[str] | None) -> bool:
    params = _params(item)
    dev = next((getattr(params[k], "type", None) or str(params[k]).split(":")[0]
                for k in ("device", "dev") if k in params),
               "cuda" if item.get_closest_marker("gpu") is not None else None)
    backend = params.get("backend")
    return dev == device and (backends is None or backend is None or str(backend) in backends)


def pytest_collection_modifyitems(config, items):
    if not (device := os.environ.get("FASTSSL_TESTS_DEVICE")):
        return
    names = os.environ.get("FASTSSL_TESTS_BACKENDS", "")
    backends = {b.strip() for b in names.split(",") if b.strip()} or None
    keep = [item for item in items if selected(item, device, backends)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _write(report, outcome: str, when: str) -> None:
    path = os.environ.get("FASTSSL_TESTS_LOG")
    # Under pytest-xdist each report reaches the hooks in the worker and in the controller: only
    # the controller writes.
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    message = ""
    if report.skipped:
        rep = report.longrepr
        message = str(rep[2]) if isinstance(rep, tuple) else str(rep or "")
    elif report.failed:
        text = (getattr(report, "longreprtext", "") or str(report.longrepr or "")).strip()
        errors = [ln for ln in text.splitlines() if ln.startswith("E ")]
        message = "\n".join(errors[-6:]) or text[-600:]
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
