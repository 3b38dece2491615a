"""Weighted k-NN: the blocked implementation against a brute-force reference, the tie rules,
top-5, the multi-rank feature gather, the CLI, and pretrained-vs-random on the demo data."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastssl.models.features import extract_features, gather_rows
from fastssl.models.knn import knn_eval_features, knn_predict, topk_correct, topk_neighbours

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def brute_force_votes(train, labels, test, k, temperature, num_classes):
    """Row by row in float64: neighbours by (similarity desc, bank index asc)."""
    train = torch.nn.functional.normalize(train.double(), dim=1).numpy()
    test = torch.nn.functional.normalize(test.double(), dim=1).numpy()
    labels = labels.numpy()
    k = min(k, train.shape[0])
    out = np.zeros((test.shape[0], num_classes))
    for i, row in enumerate(test):
        sim = train @ row
        order = np.lexsort((np.arange(sim.size), -sim))[:k]
        for j in order:
            out[i, labels[j]] += math.exp(sim[j] / temperature)
    return torch.from_numpy(out)


def brute_force_correct(votes, labels, m):
    """Ranking by a stable sort of (score desc, class asc); zero-vote classes never predicted."""
    n = 0
    for row, y in zip(votes.tolist(), labels.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], c))
        ranked = [c for c in ranked if row[c] > 0]
        n += y in ranked[:m]
    return n


def _random_problem(n_train=57, n_test=23, dim=6, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n_train, dim, generator=g),
        torch.randint(0, classes, (n_train,), generator=g),
        torch.randn(n_test, dim, generator=g),
        torch.randint(0, classes, (n_test,), generator=g),
    )


@pytest.mark.parametrize("block_size", [1, 4, 23, 1000])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_blocked_equals_brute_force(block_size, k):
    train, labels, test, _ = _random_problem()
    got = knn_predict(
        train, labels, test, k=k, temperature=0.07, num_classes=7, block_size=block_size
    )
    want = brute_force_votes(train, labels, test, k, 0.07, 7)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)


def test_multi_k_matches_single_k_and_auto_block():
    train, labels, test, _ = _random_problem(seed=3)
    many = knn_predict(train, labels, test, k=(3, 10, 40), temperature=0.1, num_classes=7)
    for k in (3, 10, 40):
        one = knn_predict(train, labels, test, k=k, temperature=0.1, num_classes=7, block_size=5)
        torch.testing.assert_close(many[k], one)


def test_k_larger_than_bank_is_clipped_with_a_warning():
    train, labels, test, _ = _random_problem(n_train=9)
    with pytest.warns(UserWarning, match="exceeds the 9 rows"):
        got = knn_predict(train, labels, test, k=50, num_classes=7, block_size=4)
    want = knn_predict(train, labels, test, k=9, num_classes=7, block_size=4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.double(), brute_force_votes(train, labels, test, 9, 0.07, 7),
                               rtol=2e-5, atol=1e-6)


def test_ties_go_to_the_lower_bank_index():
    # Duplicated bank rows with different labels: exact ties at the k-th place.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g)
    train = base.repeat(4, 1)                      # row j and j+6, j+12, j+18 are identical
    labels = torch.arange(24) % 5
    test = torch.cat([base[:3], torch.randn(5, 4, generator=g)])
    for k in (1, 2, 3, 5, 7):
        for block in (1, 3, 100):
            got = knn_predict(train, labels, test, k=k, num_classes=5, block_size=block)
            want = brute_force_votes(train, labels, test, k, 0.07, 5)
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6,
                                       msg=f"k={k} block={block}")
    # The neighbour list itself: equal similarities ordered by index.
    sim = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    vals, idx = topk_neighbours(sim, 4)
    assert idx.tolist() == [[1, 3, 0, 2]]
    torch.testing.assert_close(vals, torch.tensor([[0.9, 0.9, 0.5, 0.5]]))


def test_fp16_bank_with_many_ties():
    # float16 rounding makes ties common: still the brute-force rule on the rounded similarities.
    train, labels, test, _ = _random_problem(n_train=40, n_test=10, dim=3, seed=5)
    train = torch.nn.functional.normalize(train, dim=1).half().float().round(decimals=1)
    got = knn_predict(train, labels, test.round(decimals=1), k=6, num_classes=7, block_size=3,
                      normalize=False)
    sim = test.round(decimals=1) @ train.T
    for i in range(sim.shape[0]):
        order = np.lexsort((np.arange(sim.shape[1]), -sim[i].numpy()))[:6]
        want = torch.zeros(7, dtype=torch.float64)
        for j in order:
            want[labels[j]] += math.exp(sim[i, j].item() / 0.07)
        torch.testing.assert_close(got[i].double(), want, rtol=2e-5, atol=1e-6)


def test_top5_and_tie_rule_of_topk_correct():
    scores = torch.tensor([[0.0, 3.0, 1.0, 1.0, 0.0, 2.0, 0.5],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                           [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0]])
    labels = torch.tensor([3, 5, 6])
    c = topk_correct(scores, labels, (1, 2, 3, 4, 5, 7))
    # row 0: ranking 1,5,2,3,6 -> class 3 is 4th; row 1: all equal, class 5 is 6th by index;
    # row 2: class 6 has no vote -> never counted.
    assert {m: int(v) for m, v in c.items()} == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 7: 2}
    for m in (1, 2, 3, 4, 5, 7):
        assert int(c[m]) == brute_force_correct(scores, labels, m)


def test_accuracy_from_features_matches_brute_force():
    train, labels, test, test_labels = _random_problem(n_train=80, n_test=40, classes=6, seed=2)
    # Give the features class structure so that accuracies are not trivial.
    centres = torch.randn(6, 6, generator=torch.Generator().manual_seed(9)) * 2
    train, test = train + centres[labels], test + centres[test_labels]
    res = knn_eval_features(
        train, labels, test, test_labels, k=(1, 10), num_classes=6, block_size=7
    )
    for k in (1, 10):
        votes = brute_force_votes(train, labels, test, k, 0.07, 6)
        assert res[k]["top1"] == pytest.approx(
            100 * brute_force_correct(votes, test_labels, 1) / 40
        )
        assert res[k]["top5"] == pytest.approx(
            100 * brute_force_correct(votes, test_labels, 5) / 40
        )
    assert res[10]["top1"] > 60


@pytest.mark.gpu
def test_cuda_bank_and_cpu_bank_agree():
    train, labels, test, _ = _random_problem(n_train=3000, n_test=500, dim=64, classes=10, seed=4)
    cpu = knn_predict(train, labels, test, k=(20, 200), num_classes=10, block_size=64)
    gpu = knn_predict(
        train.cuda(), labels.cuda(), test, k=(20, 200), num_classes=10, block_size=100
    )
    for k in (20, 200):
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], rtol=1e-4, atol=1e-3)


def test_bad_inputs_are_named():
    train, labels, test, _ = _random_problem()
    with pytest.raises(ValueError, match="test_feats"):
        knn_predict(train, labels, test[:, :3], k=5, num_classes=7)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels[:-1], test, k=5, num_classes=7)
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(train, labels, test, k=5, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, test, k=5, temperature=0.0, num_classes=7)
    with pytest.raises(ValueError, match="k"):
        knn_predict(train, labels, test, k=0, num_classes=7)
    with pytest.raises(ValueError, match="block_size"):
        knn_predict(train, labels, test, k=5, num_classes=7, block_size=0)
    with pytest.raises(TypeError, match="train_labels"):
        knn_predict(train, labels.float(), test, k=5, num_classes=7)


def test_extract_features_restores_mode_and_concatenates():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.BatchNorm1d(5))
    model.train()
    before = model[2].running_mean.clone()
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])),
               (torch.randn(3, 3, 2, 2), torch.tensor([4, 5, 6]))]
    f, y = extract_features(model, batches, "cpu")
    assert f.shape == (7, 5) and f.dtype == torch.float32 and y.tolist() == list(range(7))
    assert model.training
    torch.testing.assert_close(model[2].running_mean, before)  # eval mode: BN stats untouched


# ------------------------------------------------------------------ multi-rank gather (gloo)

def worker_gather_unequal():
    from fastssl import distributed as D
    r = D.rank()
    n = 3 + 2 * r                                   # unequal shards: 3 and 5 rows
    f = torch.full((n, 2), float(r)) + torch.arange(n)[:, None] / 10
    y = torch.arange(n) + 100 * r
    return gather_rows(f, y, chunk_rows=2)


@pytest.mark.distributed
def test_gather_pads_and_drops_unequal_shards():
    from fastssl.testing import run_torchrun
    results = run_torchrun(f"{os.path.abspath(__file__)}:worker_gather_unequal", 2)
    want_y = list(range(3)) + [100 + i for i in range(5)]
    for f, y in results:
        assert y.tolist() == want_y
        assert f.shape == (8, 2)
        torch.testing.assert_close(f[3:, 0], torch.ones(5) + torch.arange(5) / 10)


def _seeded_resnet18():
    from fastssl.models import build_backbone
    torch.manual_seed(0)
    return build_backbone("resnet18", zero_init_residual=False)[0]


def worker_knn_accuracy():
    from fastssl.eval.knn import knn_accuracy
    return knn_accuracy(_seeded_resnet18(), "demo", k=(5, 20), device="cpu", batch_size=64)


@pytest.mark.distributed
def test_two_rank_knn_accuracy_equals_single_process():
    # Sharded eval loaders (unequal shards), the padded gather of the bank and the summed counts
    # give exactly the single-process accuracy.
    from fastssl.eval.knn import knn_accuracy
    from fastssl.testing import run_torchrun
    want = knn_accuracy(_seeded_resnet18(), "demo", k=(5, 20), device="cpu", batch_size=64)
    # Tolerance: one val image (of 150), in case a different batch composition changes a
    # feature's float rounding enough to swap a neighbour; on this machine they are equal.
    one_image = 100.0 / 150 + 1e-9
    for got in run_torchrun(f"{os.path.abspath(__file__)}:worker_knn_accuracy", 2):
        for k in (5, 20):
            assert got[k]["top1"] == pytest.approx(want[k]["top1"], abs=one_image)
            assert got[k]["top5"] == pytest.approx(want[k]["top5"], abs=one_image)


# ------------------------------------------------------------------ command line

def _run_cli(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "fastssl.eval.knn", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_help():
    proc = _run_cli("--help")
    assert proc.returncode == 0
    for opt in ("--checkpoint", "--data", "--k", "--temperature", "--block-size", "--bank-device",
                "--batch-size", "--device"):
        assert opt in proc.stdout


def _main_error(argv, capsys):
    """Run the CLI in-process (no interpreter start-up); return (exit status, stderr)."""
    from fastssl.eval.knn import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    code, err = _main_error(
        ["--checkpoint", str(missing), "--data", "demo", "--device", "cpu"], capsys
    )
    assert code != 0 and str(missing) in err and "not found" in err


def test_cli_mismatched_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3), "something.else": torch.zeros(1)}, bad)
    code, err = _main_error(["--checkpoint", str(bad), "--arch", "resnet18", "--data", "demo",
                             "--device", "cpu"], capsys)
    assert code != 0 and str(bad) in err and "missing keys" in err


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    code, err = _main_error(
        ["--checkpoint", str(junk), "--data", "demo", "--device", "cpu"], capsys
    )
    assert code != 0 and str(junk) in err and "cannot be read" in err


# ------------------------------------------------------------------ demo data: trained vs random

PRETRAIN_EPOCHS = 4


@pytest.fixture(scope="module")
def pretrained_checkpoint(tmp_path_factory):
    """A short demo pretraining run of the trainer (SimCLR demo preset, ResNet-18, CPU)."""
    from fastssl.methods.presets import PRESETS
    from fastssl.train import make_config, train
    out = tmp_path_factory.mktemp("pretrain")
    cfg = make_config(PRESETS["demo"], {"epochs": PRETRAIN_EPOCHS, "out": str(out), "knn_every": 0,
                                        "device": "cpu", "log_every": 1000})
    result = train(cfg, stream=open(os.devnull, "w"))
    assert result["status"] == "completed"
    return result["checkpoint"]


@pytest.mark.slow
def test_pretrained_backbone_beats_random_init_on_demo(pretrained_checkpoint, tmp_path, capsys):
    from fastssl.eval.knn import knn_accuracy, main
    from fastssl.models import build_backbone
    out = tmp_path / "knn.json"
    # The CLI on the trainer's checkpoint (in-process: the --help test covers python -m).
    assert main(["--checkpoint", pretrained_checkpoint, "--data", "demo", "--device", "cpu",
                 "--k", "20", "200", "--output", str(out)]) == 0
    assert "k-NN k=20" in capsys.readouterr().out
    trained = {int(k): v for k, v in json.loads(out.read_text())["knn"].items()}
    torch.manual_seed(0)
    random_init, _ = build_backbone("resnet18")
    rand = knn_accuracy(random_init, "demo", k=(20, 200), device="cpu")
    print(
        f"demo k-NN top-1 (k=20): trained {trained[20]['top1']:.1f}% vs random init "
        f"{rand[20]['top1']:.1f}%; k=200: {trained[200]['top1']:.1f}% vs {rand[200]['top1']:.1f}%"
    )
    assert trained[20]["top1"] > rand[20]["top1"] + 5.0
    assert trained[20]["top5"] >= trained[20]["top1"]


@pytest.mark.slow
def test_knn_accuracy_equals_features_path(pretrained_checkpoint):
    # The library path (eval loaders -> features -> blocked k-NN) agrees with the brute-force
    # votes on the same features.
    from fastssl.data import build_eval_loader
    from fastssl.eval.knn import knn_accuracy
    from fastssl.models import load_backbone
    model = load_backbone(pretrained_checkpoint, "resnet18")
    got = knn_accuracy(model, "demo", k=(5,), device="cpu", block_size=7)
    tr, va = (build_eval_loader("demo", s, 128, size=32, device="cpu") for s in ("train", "val"))
    f_tr, y_tr = extract_features(model, tr, "cpu")
    f_va, y_va = extract_features(model, va, "cpu")
    votes = brute_force_votes(f_tr, y_tr, f_va, 5, 0.07, tr.num_classes)
    assert got[5]["top1"] == pytest.approx(100 * brute_force_correct(votes, y_va, 1) / len(y_va))
    assert got[5]["top5"] == pytest.approx(100 * brute_force_correct(votes, y_va, 5) / len(y_va))
