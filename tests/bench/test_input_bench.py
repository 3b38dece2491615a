"""bench.input (python -m bench --op input): the host input path measured on generated JPEGs."""
import json

from bench import input as input_bench


def test_generated_files_are_imagenet_like_jpegs(tmp_path):
    files = input_bench.generate_jpegs(tmp_path, 6)
    assert len(files) == 6 and all(f.read_bytes()[:2] == b"\xff\xd8" for f in files)
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1e3
    assert 60 < mean_kb < 200


def test_cores_per_gpu_divides_the_affinity(monkeypatch):
    monkeypatch.setattr(input_bench.os, "sched_getaffinity", lambda pid: set(range(96)))
    assert input_bench.cores_per_gpu(8) == 12
    assert input_bench.cores_per_gpu(128) == 1
    from fastssl.data.loaders import default_num_threads
    assert default_num_threads("cpu", 8) == 12          # CPU DALI decodes: the whole share
    monkeypatch.setattr(input_bench.os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_num_threads("cpu", 1) == 2


def test_bench_op_input_writes_records(tmp_path, monkeypatch):
    from bench.__main__ import main
    monkeypatch.setattr(input_bench, "CACHE", tmp_path / "jpeg")
    stages = "read+params,dali-cpu" if _has_dali() else "read+params"
    assert main(["--op", "input", "--quick", "--threads", "1", "--stages", stages,
                 "--out", str(tmp_path / "out")]) == 0
    records = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert {r["stage"] for r in records} == set(stages.split(","))
    assert {r["recipe"] for r in records} == {"simclr_2x224", "swav_2x224+6x96"}
    for r in records:
        assert r["images"] > 0 and r["per_core_img_s"] > 0 and "load1" in r
    assert "img/s per core" in (tmp_path / "out" / "summary.md").read_text()


def _has_dali():
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False
