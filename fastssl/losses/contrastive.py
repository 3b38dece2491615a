"""nn.Module wrappers of the contrastive losses (hyperparameters in __init__, state as buffers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl import functional as FF
from fastssl._validation import check_int, check_positive, check_range


class NTXentLoss(torch.nn.Module):
    """SimCLR NT-Xent; see :func:`fastssl.functional.nt_xent`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return FF.nt_xent(z1, z2, self.temperature, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class InfoNCELoss(torch.nn.Module):
    """InfoNCE (MoCo v3 / CLIP); see :func:`fastssl.functional.info_nce`."""

    def __init__(self, temperature: float = 0.1, symmetric: bool = False,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.symmetric = symmetric
        self.gather_distributed = gather_distributed

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return FF.info_nce(q, k, self.temperature, symmetric=self.symmetric,
                           gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"gather_distributed={self.gather_distributed}")


class DCLLoss(torch.nn.Module):
    """Decoupled contrastive loss (lightly DCLLoss); see :func:`fastssl.functional.dcl`."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = False):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return FF.dcl(z1, z2, self.temperature, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class SogCLRLoss(torch.nn.Module):
    """SogCLR with the per-sample estimator as buffer ``u`` (float32, (num_samples,)): saved in
    the state_dict, moved by ``.to()``, kept identical on every rank by the gathered update."""

    def __init__(self, num_samples: int, gamma: float = 0.9, temperature: float = 0.1,
                 gather_distributed: bool = False):
        super().__init__()
        check_int("num_samples", num_samples, minimum=1)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
        self.temperature = check_positive("temperature", temperature)
        self.gather_distributed = gather_distributed
        self.register_buffer("u", torch.zeros(num_samples, dtype=torch.float32))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return FF.sogclr(z1, z2, index, self.u, gamma=self.gamma, temperature=self.temperature,
                         gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"num_samples={self.u.shape[0]}, gamma={self.gamma}, "
                f"temperature={self.temperature}, gather_distributed={self.gather_distributed}")


class SCELoss(torch.nn.Module):
    """SCE with a FIFO queue of normalised keys (buffer ``queue`` (K, D), random normalised at
    init, and ``queue_ptr``). The loss uses the queue as it was before the call; the (gathered)
    keys of the call are enqueued afterwards. ``queue_size=0`` means no queue (then
    ``use_keys=True`` is needed)."""

    def __init__(self, dim: int, queue_size: int = 65536, coeff: float = 0.5,
                 temperature: float = 0.1, temperature_m: float = 0.07, use_keys: bool = False,
                 gather_distributed: bool = False):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("queue_size", queue_size, minimum=0)
        if queue_size == 0 and not use_keys:
            raise ValueError("queue_size: 0 (no queue) with use_keys=False leaves SCE without "
                             "negatives; use queue_size > 0 or use_keys=True")
        self.coeff = check_range("coeff", coeff, 0.0, 1.0)
        self.temperature = check_positive("temperature", temperature)
        self.temperature_m = check_positive("temperature_m", temperature_m)
        self.use_keys = use_keys
        self.gather_distributed = gather_distributed
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        size = self.queue.shape[0]
        # The loss keeps the queue for its backward: give it a snapshot, then enqueue in place.
        queue = self.queue.clone() if size > 0 else None
        loss = FF.sce(q, k, queue, coeff=self.coeff, temperature=self.temperature,
                      temperature_m=self.temperature_m, use_keys=self.use_keys,
                      gather_distributed=self.gather_distributed)
        if size > 0:
            self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        keys = F.normalize(k.detach().float(), dim=1)
        if self.gather_distributed and dist_utils.is_distributed():
            keys = dist_utils.gather_no_grad(keys, name="k")
        size, n = self.queue.shape[0], keys.shape[0]
        if n > size:
            # Only the newest `size` keys survive a wrap-around; the pointer moves by n anyway.
            keys, start = keys[n - size:], self.queue_ptr + (n - size)
        else:
            start = self.queue_ptr
        slots = (start + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def extra_repr(self) -> str:
        return (f"dim={self.queue.shape[1]}, queue_size={self.queue.shape[0]}, coeff={self.coeff}, "
                f"temperature={self.temperature}, temperature_m={self.temperature_m}, "
                f"use_keys={self.use_keys}, gather_distributed={self.gather_distributed}")
