"""Every command shown in README.md's ```bash blocks runs, at demo size, so the README cannot
drift from the code.

Each command line (``&&`` chains split, the venv / ``pip install`` steps dropped: CI performs
them) is mapped to a cheap invocation of the same command: the same program and flags, plus
flags it already accepts that make it small (one epoch, ResNet-18, tiny batches, small images),
``/imagenet`` replaced by the demo ImageFolder, run in a scratch directory (so ``runs/...``
paths land there). A README command with no mapping fails `test_readme_command`, so a new
command must come with its cheap form here. Only the GPU-only command is skipped (with the
reason); the GPU suite's CPU dry run (minutes) is run by tests/bench/test_gpu_run.py, which this
test checks.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 300

_INSTALL = re.compile(r"^python3? -m venv |(^|/)pip install ")
_COMMENT = re.compile(r"\s+#\s.*$")


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order, install steps dropped, duplicates once."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            line = _COMMENT.sub("", line).strip()
            for part in (p.strip() for p in line.split("&&")):
                if not part or _INSTALL.search(part):
                    continue
                part = part.replace(".venv/bin/python", "python")
                if part not in out:
                    out.append(part)
    return out


COMMANDS = readme_commands(open(README).read())

# flags that make a training command small (all existing train_imagenet.py flags)
_TINY_TRAIN = ["--arch", "resnet18", "--batch-size", "8", "--epochs", "1", "--max-steps", "1",
               "--knn-every", "0", "--num-threads", "1", "--head", "projector=[64,32]"]


def cheap(command: str, demo_root: str):
    """(argv, check, skip reason) of the cheap form of a README command; ValueError if unmapped.
    `check(stdout)` asserts what the command must have printed."""
    argv = [demo_root if a == "/imagenet" else a for a in shlex.split(command)]
    train = os.path.join(ROOT, "train_imagenet.py")
    argv = [train if a == "train_imagenet.py" else a for a in argv]

    def has(*flags):
        return all(f in argv for f in flags)

    if argv[:2] == ["python", train]:
        rest = argv[2:]
        argv = [sys.executable, train, *rest]
        if not rest:                                   # the demo
            return argv + ["--epochs", "1", "--knn-train-samples", "100", "--out", "demo_run"], \
                lambda out: _assert_in("learned features", out), None
        if rest == ["--list-presets"]:
            return argv, lambda out: _assert_in("groco_2views_100ep", out), None
        if "--print-config" in rest:
            return argv, lambda out: json.loads(out)["data"] == demo_root or _fail(out), None
    if argv[0] == "torchrun" and train in argv:
        i = argv.index(train)
        launcher = [a for a in argv[1:i] if not a.startswith("--nproc_per_node")]
        small_groco = ["--method-arg", "topk_neg=4"] if "groco" in command else []  # batch 8
        return ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=1", *launcher, train, *argv[i + 1:], *_TINY_TRAIN,
                 *small_groco],
                lambda out: _assert_in("step 1: checkpoint", out), None)
    if argv[:3] == ["python", "-m", "fastssl.eval.knn"] and has("--checkpoint"):
        return ([sys.executable, *argv[1:], "--size", "32", "--num-threads", "1"],
                lambda out: _assert_in("k-NN k=20", out), None)
    if argv[:3] == ["python", "-m", "fastssl.eval.linear"] and has("--checkpoint"):
        if "--arch" in argv:                           # the cheap pretraining ran a ResNet-18
            argv[argv.index("--arch") + 1] = "resnet18"
        return ([sys.executable, *argv[1:], "--size", "32", "--cached-features", "--epochs", "1",
                 "--num-threads", "1"], lambda out: _assert_in("linear probe", out), None)
    if argv == ["python", "-m", "pytest", "tests"]:    # CI runs it; here: it collects cleanly
        return ([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                 os.path.join(ROOT, "tests")], lambda out: _assert_in("tests collected", out), None)
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "bench.gpu_run"]:
        if "--dry-run" in argv:                        # minutes: run once, by its own test
            return None, "tests/bench/test_gpu_run.py", None
        return None, None, "GPU-only: needs a CUDA device (its CPU dry run is the next command)"
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "bench.preflight"]:
        # --prepare downloads diffsort's wheel; the full one builds a multi-GB environment once
        # and runs for many minutes: run by hand, its log committed in bench/results/preflight/
        return (
            None,
            None,
            (
                "run by hand (network, GBs of wheels, minutes): its log is committed in "
                "bench/results/preflight/; the dry run it runs is tests/bench/test_gpu_run.py"
            ),
        )
    raise ValueError(f"README command with no cheap form: {command!r}; add one to {__file__}")


def _assert_in(needle, out):
    assert needle in out, out[-3000:]


def _fail(out):
    raise AssertionError(out[-3000:])


def test_readme_has_the_commands():
    assert len(COMMANDS) >= 9, COMMANDS
    for needle in ("train_imagenet.py", "torchrun", "fastssl.eval.knn", "fastssl.eval.linear",
                   "--print-config", "pytest"):
        assert any(needle in c for c in COMMANDS), needle
    assert not any("pip install" in c or "venv" in c for c in COMMANDS)


def test_readme_parser_drops_only_install_steps():
    text = ("```bash\npython3 -m venv .venv && .venv/bin/pip install torch && "
            ".venv/bin/python train_imagenet.py   # the demo\n"
            "python -m x --a 1 && python -m y\n```\n```python\nnot_a_command()\n```\n")
    assert readme_commands(text) == ["python train_imagenet.py", "python -m x --a 1",
                                     "python -m y"]
    with pytest.raises(ValueError, match="no cheap form"):
        cheap("python -m some.new.tool --flag", "/demo")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    from fastssl.data import demo_dataset
    return str(tmp_path_factory.mktemp("readme")), demo_dataset()


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[re.sub(r"[^\w.=-]+", "_", c)[:70] for c in COMMANDS]
)
def test_readme_command(command, scratch):
    """In README order: the evaluation commands read what the torchrun command wrote."""
    cwd, demo_root = scratch
    argv, check, skip = cheap(command, demo_root)
    if skip:
        pytest.skip(skip)
    if argv is None:                      # run by another test (`check` names it): make sure
        src = open(os.path.join(ROOT, check)).read()
        assert '"bench.gpu_run", "--dry-run"' in src
        return
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    check(proc.stdout)
