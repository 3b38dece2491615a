"""The eval command lines answer bad arguments with `error: ...` (or argparse's message) and exit
status 2, never a traceback."""
import pytest
import torch


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fastssl.models import build_backbone
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.manual_seed(0)
    torch.save(build_backbone("resnet18")[0].state_dict(), path)
    return str(path)


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return info.value.code, err


def _knn():
    from fastssl.eval.knn import main
    return main


def _linear():
    from fastssl.eval.linear import main
    return main


@pytest.mark.parametrize("tool,flags,needle", [
    ("knn", ["--k", "0"], "argument --k: expected a positive integer, got 0"),
    ("knn", ["--k", "20", "-3"], "argument --k: expected a positive integer, got -3"),
    ("knn", ["--temperature", "0"], "argument --temperature: expected a positive number"),
    ("knn", ["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
    ("linear", ["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    ("linear", ["--lr", "-1"], "argument --lr: expected a positive number, got -1"),
    ("linear", ["--lr", "nan"], "argument --lr: expected a positive number, got nan"),
    ("linear", ["--weight-decay", "-0.1"], "argument --weight-decay: expected a number >= 0"),
    ("knn", ["--dist-timeout", "0"], "argument --dist-timeout: expected a duration > 0"),
    ("linear", ["--dist-timeout", "ten"], "argument --dist-timeout: expected seconds (600, 600s) "
                                          "or minutes (10m, 10min)"),
])
def test_bad_numbers_are_argparse_errors(tool, flags, needle, checkpoint, capsys):
    main = _knn() if tool == "knn" else _linear()
    code, err = _exit(main, ["--checkpoint", checkpoint, "--device", "cpu", *flags], capsys)
    assert code == 2 and needle in err


@pytest.mark.parametrize("tool", ["knn", "linear"])
def test_empty_data_folder_is_an_error(tool, checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    main = _knn() if tool == "knn" else _linear()
    code, err = _exit(main, ["--checkpoint", checkpoint, "--arch", "resnet18", "--device", "cpu",
                             "--data", str(empty)],
                      capsys)
    assert code == 2 and err.startswith("error: ") and str(empty) in err


@pytest.mark.parametrize("tool", ["knn", "linear"])
def test_unusable_output_path_is_named_before_any_work(tool, checkpoint, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    main = _knn() if tool == "knn" else _linear()
    for output, needle in ((tmp_path, "is a directory"), (a_file / "out.json", "the directory")):
        code, err = _exit(main, ["--checkpoint", checkpoint, "--device", "cpu", "--output",
                                 str(output)], capsys)
        assert code == 2 and f"error: --output {output}: {needle}" in err


def test_write_json_failure_names_the_path(tmp_path):
    from fastssl.eval import _cli

    with pytest.raises(
        _cli.EvalError, match=f"--output {tmp_path / 'nodir' / 'x.json'}: cannot write"
    ):
        _cli.write_json(str(tmp_path / "nodir" / "x.json"), {"a": 1})
