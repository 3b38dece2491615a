"""A loss state that differs per rank (SwAV's queue) is checkpointed for every rank and restored to
its own rank: 2 gloo ranks, stop mid-run, resume, and every rank ends bitwise equal to an
uninterrupted run (the old checkpoint held rank 0's queue only and gave it to every rank)."""
import pytest
import torch

from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed


def _config(out, **over):
    from fastssl.methods.presets import get_preset
    from fastssl.train.config import make_config
    preset = get_preset("demo_swav")
    values = dict(backend="synthetic", dataset_size=32, batch_size=8, epochs=2, knn_every=0,
                  crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2},
                         {"size": 8, "scale": [0.1, 0.3], "count": 1}],
                  log_every=1, heads={"projector": [32, 16]}, out=out,
                  # queue of 8 rows per rank (16 global), used from the first epoch, full at step 2
                  method_args={**preset["method_args"], "n_prototypes": 10, "queue_length": 16,
                               "epoch_queue_starts": 0, "freeze_prototypes_iters": 1})
    values.update(over)
    return make_config(preset, values)


def worker(tmp):
    import os
    from fastssl.train.loop import train
    torch.set_num_threads(1)
    devnull = open(os.devnull, "w")
    full = train(_config(f"{tmp}/full"), stream=devnull)
    part = train(_config(f"{tmp}/part", max_steps=5), stream=devnull)
    resumed = train(_config(f"{tmp}/part", resume="auto"), stream=devnull)
    own = {}
    for name, result in (("full", full), ("resumed", resumed)):
        method = result["model"]
        own[name] = {k: v.detach().clone() for k, v in method.state_dict().items()}
    import torch.distributed as dist
    state = torch.load(f"{tmp}/part/checkpoint_last.pth", weights_only=False)
    return {"status": (full["status"], part["status"], part["step"], resumed["status"],
                       resumed["step"]),
            "models": own, "n_saved": len(state.get("loss_state_per_rank") or []),
            "queues": {name: _queue(f"{tmp}/{name}/checkpoint_last.pth", dist.get_rank())
                       for name in ("full", "part")}}


def _queue(path, rank):
    state = torch.load(path, weights_only=False)
    return state["loss_state_per_rank"][rank]


def test_swav_queue_is_saved_and_restored_per_rank(tmp_path):
    results = run_torchrun(f"{__file__}:worker", 2, {"tmp": str(tmp_path)}, timeout=600)
    for rank, res in enumerate(results):
        assert res["status"] == ("completed", "stopped", 5, "completed", 8), res["status"]
        assert res["n_saved"] == 2
        full, resumed = res["queues"]["full"], res["queues"]["part"]
        assert full["queue"].shape == (2, 8, 16) and int(full["queue_count"]) == 8
        torch.testing.assert_close(resumed["queue"], full["queue"], rtol=0, atol=0,
                                   msg=f"rank {rank} queue after resume")
        for key, value in res["models"]["full"].items():
            torch.testing.assert_close(res["models"]["resumed"][key], value, rtol=0, atol=0,
                                       msg=f"rank {rank} {key}")
    # the ranks' queues hold different embeddings: a shared queue would be wrong for one of them
    assert not torch.equal(
        results[0]["queues"]["full"]["queue"], results[1]["queues"]["full"]["queue"]
    )
