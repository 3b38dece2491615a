"""Linear probe: recipes, the head's training on fixed features, top-k counting, the demo data
in cached-features and end-to-end modes, and the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastssl.eval.linear import (PRESETS, cosine_lr, logits_correct, resolve_recipe,
                                 train_linear_on_features)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_presets_follow_the_seeds():
    g = PRESETS["groco"]
    assert (g.optimizer, g.batch_size, g.epochs, g.lr, g.weight_decay, g.momentum) == \
        ("larc", 4096, 90, pytest.approx(0.1 * 4096 / 256), 0.0, 0.9)
    s = PRESETS["sfrik"]
    assert (s.optimizer, s.batch_size, s.epochs, s.lr, s.weight_decay) == (
        "sgd",
        256,
        100,
        0.4,
        1e-6,
    )
    c = PRESETS["sogclr"]
    assert (c.optimizer, c.batch_size, c.epochs, c.weight_decay) == ("sgd", 1024, 90, 0.0)


def test_recipe_overrides_and_linear_lr_scaling():
    r = resolve_recipe("groco", batch_size=1024)
    assert r.lr == pytest.approx(1.6 / 4)
    r = resolve_recipe("groco", batch_size=1024, lr=0.3, epochs=5, optimizer="sgd")
    assert (r.lr, r.epochs, r.optimizer) == (0.3, 5, "sgd")
    with pytest.raises(ValueError, match="preset"):
        resolve_recipe("nope")
    with pytest.raises(ValueError, match="lr"):
        resolve_recipe("demo", lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        resolve_recipe("demo", optimizer="adam")


def test_cosine_schedule():
    assert cosine_lr(0, 100, 2.0) == pytest.approx(2.0)
    assert cosine_lr(50, 100, 2.0) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 2.0) == pytest.approx(0.0)


def test_logits_correct():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.5], [0.0, 0.2, 0.1]])
    labels = torch.tensor([1, 2, 0])
    c = logits_correct(logits, labels, (1, 2, 5))
    assert {m: int(v) for m, v in c.items()} == {1: 1, 2: 2, 5: 3}


def _blobs(n_per_class, classes, dim, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(y.shape[0], dim, generator=g)
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "larc", "lars"])
def test_head_learns_separable_features(optimizer):
    tx, ty = _blobs(40, 5, 16, 0)
    vx, vy = _blobs(20, 5, 16, 1)
    recipe = resolve_recipe("demo", epochs=15, batch_size=32, optimizer=optimizer,
                            lr=0.5 if optimizer == "sgd" else 20.0)
    head, res = train_linear_on_features(tx, ty, vx, vy, num_classes=5, recipe=recipe, log=None)
    assert res["top1"] > 90.0, res
    assert res["top5"] == 100.0
    assert head.weight.shape == (5, 16)


def test_feature_training_is_deterministic_in_seed():
    tx, ty = _blobs(20, 3, 8, 0, spread=3.0)
    recipe = resolve_recipe("demo", epochs=3, batch_size=16)
    h1, _ = train_linear_on_features(tx, ty, tx, ty, num_classes=3, recipe=recipe, seed=4, log=None)
    h2, _ = train_linear_on_features(tx, ty, tx, ty, num_classes=3, recipe=recipe, seed=4, log=None)
    torch.testing.assert_close(h1.weight, h2.weight)


# ------------------------------------------------------------------ demo data (DALI on CPU)

@pytest.fixture(scope="module")
def random_backbone(tmp_path_factory):
    """A random-init ResNet-18 and a torchvision-format checkpoint of it ("module." prefix, fc)."""
    from fastssl.models import backbone_state_dict, build_backbone
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", zero_init_residual=False)
    state = {f"module.{k}": v for k, v in backbone_state_dict(model).items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)
    state["module.fc.bias"] = torch.zeros(1000)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_torchvision.pth"
    torch.save(state, path)
    return model, path


@pytest.fixture(scope="module")
def demo_chance():
    from fastssl.data import build_eval_loader
    return 100.0 / build_eval_loader("demo", "val", 8, size=32, device="cpu").num_classes


def test_cached_features_probe_learns_on_demo(random_backbone, demo_chance):
    from fastssl.eval.linear import linear_probe
    model, _ = random_backbone
    res = linear_probe(model, "demo", cached_features=True, epochs=30, device="cpu", log=None)
    print(f"cached-features linear probe on demo: {res['top1']:.1f}% top-1, "
          f"{res['top5']:.1f}% top-5 (chance {demo_chance:.1f}%)")
    assert res["mode"] == "cached-features"
    assert res["top1"] > 2.5 * demo_chance, res
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_end_to_end_probe_learns_on_demo(random_backbone, demo_chance):
    from fastssl.eval.linear import linear_probe
    model, _ = random_backbone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = linear_probe(model, "demo", epochs=2, device="cpu", log=None)
    print(f"end-to-end linear probe on demo (2 epochs): {res['top1']:.1f}% top-1, "
          f"{res['top5']:.1f}% top-5 (chance {demo_chance:.1f}%)")
    assert res["mode"] == "end-to-end"
    assert res["top1"] > 1.5 * demo_chance, res
    # Frozen backbone: BN running statistics and weights untouched by the probe.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)


def _run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "fastssl.eval.linear", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_cached_features_on_torchvision_checkpoint(random_backbone, demo_chance, tmp_path,
                                                       capsys):
    from fastssl.eval.linear import main
    _, path = random_backbone
    out = tmp_path / "linear.json"
    # In-process (the --help test covers python -m): saves an interpreter start-up.
    assert main(["--checkpoint", str(path), "--arch", "resnet18", "--data", "demo",
                 "--cached-features", "--epochs", "30", "--device", "cpu",
                 "--output", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out
    res = json.loads(out.read_text())["linear"]
    assert res["top1"] > 2.5 * demo_chance and res["recipe"]["epochs"] == 30


def test_cli_help():
    proc = _run_cli("--help")
    assert proc.returncode == 0
    for opt in ("--checkpoint", "--data", "--preset", "--cached-features", "--epochs", "--lr",
                "groco", "sfrik", "sogclr"):
        assert opt in proc.stdout


def _main_error(argv, capsys):
    from fastssl.eval.linear import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_missing_and_mismatched_checkpoints(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    code, err = _main_error(["--checkpoint", str(missing), "--device", "cpu"], capsys)
    assert code != 0 and str(missing) in err
    bad = tmp_path / "resnet18_no_layer4.pth"
    from fastssl.models import backbone_state_dict, build_backbone
    torch.save(
        {
            "arch": "resnet18",
            "backbone": {
                k: v
                for k, v in backbone_state_dict(build_backbone("resnet18")[0]).items()
                if "layer4" not in k
            },
        },
        bad,
    )
    code, err = _main_error(["--checkpoint", str(bad), "--device", "cpu"], capsys)
    assert code != 0 and str(bad) in err and "layer4" in err
