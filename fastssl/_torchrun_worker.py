"""Entry point that fastssl.testing.run_torchrun starts on every rank (gloo, CPU)."""
import importlib.util
import os
import pickle
import sys

import torch
import torch.distributed as dist


def main() -> None:
    path, func, tmp = sys.argv[1:4]
    dist.init_process_group("gloo")
    try:
        spec = importlib.util.spec_from_file_location(f"_fastssl_worker_{os.getpid()}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with open(os.path.join(tmp, "kwargs.pkl"), "rb") as f:
            kwargs = pickle.load(f)
        result = getattr(module, func)(**kwargs)
        with open(os.path.join(tmp, f"rank{dist.get_rank()}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # every rank done with its collectives before any tears the group down: a rank that
        # destroys it while another is still mid-collective can abort that rank's gloo thread
        # ("terminate called without an active exception"). Only on success: a rank that
        # raised goes straight to the teardown, so the others fail fast instead of waiting here.
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
