"""nn.Module wrappers of the contrastive losses (hyperparameters in __init__, state as buffers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl import functional
from fastssl._checks import check_nt_xent, check_temperature
from fastssl._validation import (check_flag, check_int, check_positive, check_range,
                                 normalize_rows)


def _init_temperature(temperature):
    """A float > 0 (kept as a float) or a 0-dim tensor (kept as it is: an ``nn.Parameter``
    becomes the module's parameter, a learnable temperature)."""
    check_temperature(temperature)
    return temperature if isinstance(temperature, torch.Tensor) else float(temperature)


class NTXentLoss(torch.nn.Module):
    """SimCLR NT-Xent as a module, optionally with lightly's memory bank; see
    :func:`fastssl.functional.nt_xent`. Arguments in lightly's ``NTXentLoss`` order.

    Args:
        temperature: float > 0.
        memory_bank_size: 0 (no bank: the 2N anchors of SimCLR), an int K, or a (K, D) tuple
            as in lightly. With K > 0 the module keeps a FIFO bank of past normalised z2 rows
            (buffers ``memory_bank`` (K, D), random normalised keys at the start, created at
            the first call when only K is given, and ``memory_bank_ptr``). Each call uses the
            bank as it was before the call (z1's rows are the anchors, z2's their positives,
            the bank's rows the negatives) and then, when z1 requires grad (training, as
            lightly; not under no_grad), writes the call's normalised z2 (gathered from every
            rank under gather_distributed, so the bank is the same everywhere) at the pointer; a
            batch that runs past the end fills the bank to its end, the rest is dropped and the
            pointer returns to 0 (lightly's MemoryBankModule).
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).
        normalize: bool. True: z1 and z2 are L2-normalised inside; False: used as given
            (the bank then stores z2 as given).

    The default temperature is 0.1 (SimCLR's); lightly's ``NTXentLoss`` defaults to 0.5: for
    lightly's exact defaults and call forms use :class:`fastssl.compat.lightly.NTXentLoss`.

    ``forward(z1, z2)``: (B, D) raw embeddings of the two views (normalised inside; float32,
    bfloat16, float16 or float64). Returns a 0-dim float32 tensor (float64 for float64).

    Example::

        >>> loss = fastssl.losses.NTXentLoss(temperature=0.1)(z1, z2)
        >>> moco_style = fastssl.losses.NTXentLoss(0.1, memory_bank_size=4096)
    """

    def __init__(self, temperature: float = 0.1, memory_bank_size=0,
                 gather_distributed: bool = False, normalize: bool = True):
        super().__init__()
        self.temperature = _init_temperature(temperature)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.normalize = check_flag("normalize", normalize)
        if isinstance(memory_bank_size, (tuple, list)):
            if len(memory_bank_size) != 2:
                raise ValueError(f"memory_bank_size: expected an int or a (size, dim) tuple, "
                                 f"got {memory_bank_size!r}")
            size = check_int("memory_bank_size", memory_bank_size[0], minimum=0)
            dim = check_int("memory_bank_size", memory_bank_size[1], minimum=1)
        else:
            size, dim = check_int("memory_bank_size", memory_bank_size, minimum=0), None
        self.memory_bank_size = size
        if size > 0:  # (no bank, no state: the module stays stateless)
            bank = (F.normalize(torch.randn(size, dim), dim=1) if dim is not None
                    else torch.empty(0, 0))
            self.register_buffer("memory_bank", bank)
            self.register_buffer("memory_bank_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, temperature=None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        if self.memory_bank_size == 0:
            return functional.nt_xent(z1, z2, t, normalize=self.normalize,
                                      gather_distributed=self.gather_distributed)
        check_nt_xent(z1, z2, t, self.gather_distributed, normalize=self.normalize)
        if self.memory_bank.numel() == 0:  # K given alone: random normalised keys, z1's width
            self.memory_bank = F.normalize(
                torch.randn(self.memory_bank_size, z1.shape[1], device=z1.device), dim=1)
        elif self.memory_bank.shape[1] != z1.shape[1]:
            raise ValueError(f"z1: expected feature dimension {self.memory_bank.shape[1]} (the "
                             f"memory bank's), got shape {tuple(z1.shape)}")
        # The loss keeps the bank for its backward: give it a snapshot, then update in place.
        loss = functional.nt_xent(z1, z2, t, memory_bank=self.memory_bank.clone(),
                                  normalize=self.normalize,
                                  gather_distributed=self.gather_distributed)
        if z1.requires_grad and torch.is_grad_enabled():  # training only, as lightly
            self._enqueue(z2)
        return loss

    @torch.no_grad()
    def _enqueue(self, z2: torch.Tensor) -> None:
        keys = z2.detach().to(self.memory_bank.dtype)
        if self.normalize:
            keys = normalize_rows(keys)  # no overflow at 1e20
        if self.gather_distributed and dist_utils.is_distributed():
            keys = dist_utils.gather_no_grad(keys.contiguous(), name="memory_bank")
        size, n = self.memory_bank.shape[0], keys.shape[0]
        slots = self.memory_bank_ptr + torch.arange(n, device=keys.device)
        # Rows past the end go to a scratch row `size` (dropped): no host sync on the pointer.
        extended = torch.cat([self.memory_bank, self.memory_bank[:1]], 0)
        extended.index_copy_(0, slots.clamp(max=size), keys)
        self.memory_bank.copy_(extended[:size])
        end = self.memory_bank_ptr + n
        self.memory_bank_ptr.copy_(torch.where(end >= size, torch.zeros_like(end), end))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "memory_bank"
        if (
            self.memory_bank_size > 0
            and key in state_dict
            and tuple(state_dict[key].shape) != tuple(self.memory_bank.shape)
        ):
            if self.memory_bank.numel() == 0 and state_dict[key].shape[0] == self.memory_bank_size:
                # a bank created at the first call: take its shape from the checkpoint
                self.memory_bank = torch.empty_like(state_dict[key],
                                                    device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, memory_bank_size={self.memory_bank_size}, "
                f"gather_distributed={self.gather_distributed}, normalize={self.normalize}")


class InfoNCELoss(torch.nn.Module):
    """InfoNCE (MoCo v3 / CLIP) as a module; see :func:`fastssl.functional.info_nce`.

    Args:
        temperature: float > 0 or a 0-dim tensor (an ``nn.Parameter`` becomes the
            module's parameter); ``forward(..., temperature=t)`` overrides it per call
            (open_clip's ``1 / logit_scale.exp()``). symmetric: bool, average both directions.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).
        normalize: bool. True: q and k are L2-normalised inside; False: used as given (as
            open_clip's ``ClipLoss``, whose exact drop-in is
            :class:`fastssl.compat.open_clip.ClipLoss`).

    ``forward(q, k)``: (B, D) raw query and key embeddings, positives on the diagonal.
    Returns a 0-dim float32 tensor (float64 for float64).

    Example::

        >>> loss = fastssl.losses.InfoNCELoss(temperature=0.2, symmetric=True)(q, k)
    """

    def __init__(self, temperature: float = 0.1, symmetric: bool = False,
                 gather_distributed: bool = False, normalize: bool = True):
        super().__init__()
        self.temperature = _init_temperature(temperature)
        self.symmetric = check_flag("symmetric", symmetric)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.normalize = check_flag("normalize", normalize)

    def forward(self, q: torch.Tensor, k: torch.Tensor, temperature=None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        return functional.info_nce(q, k, t, symmetric=self.symmetric, normalize=self.normalize,
                                   gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, "
                f"gather_distributed={self.gather_distributed}, normalize={self.normalize}")


class DCLLoss(torch.nn.Module):
    """Decoupled contrastive loss (lightly ``DCLLoss`` >= 1.5.21, Yeh et al. Eq. 6): one
    log-sum-exp over the 2N-2 negatives of each anchor, the positive not in the denominator.
    ``forward(z1, z2)`` on (B, D) raw embeddings; see :func:`fastssl.functional.dcl`.

    Args:
        temperature: float > 0 or a 0-dim tensor (an ``nn.Parameter`` becomes the
            module's parameter); ``forward(..., temperature=t)`` overrides it per call
            (open_clip's ``1 / logit_scale.exp()``).
        weight_fn: optional callable ``(out0, out1) -> (B,)`` weights of the positive term
            (lightly's interface); None means weight 1.
        gather_distributed: bool, as in the functional loss (gather across ranks,
            global-batch value, DDP-exact gradient).

    Returns (forward) a 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss_fn = fastssl.losses.DCLLoss(temperature=0.1)
        >>> loss = loss_fn(z1, z2)
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False):
        super().__init__()
        self.temperature = _init_temperature(temperature)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(
                f"weight_fn: expected a callable or None, got {type(weight_fn).__name__}"
            )
        self.weight_fn = weight_fn
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, temperature=None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        return functional.dcl(z1, z2, t, weight_fn=self.weight_fn,
                              gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weight_fn={self.weight_fn!r}, "
                f"gather_distributed={self.gather_distributed}")


class DCLWLoss(torch.nn.Module):
    """Weighted DCL (lightly ``DCLWLoss``): DCL with the von Mises-Fisher weighting of the
    positive term, w_i = 2 - N softmax_i(<ẑ1_i, ẑ2_i> / sigma). ``forward(z1, z2)``; see
    :func:`fastssl.functional.dclw`.

    Args:
        temperature: float > 0 or a 0-dim tensor (an ``nn.Parameter`` becomes the
            module's parameter); ``forward(..., temperature=t)`` overrides it per call
            (open_clip's ``1 / logit_scale.exp()``). sigma: float > 0 (lightly's default 0.5).
        gather_distributed: bool, as in the functional loss (the softmax of the weights runs
            over the global batch).

    Returns (forward) a 0-dim float32 tensor (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.losses.DCLWLoss(temperature=0.1, sigma=0.5)(z1, z2)
    """

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = _init_temperature(temperature)
        self.sigma = check_positive("sigma", sigma)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, temperature=None) -> torch.Tensor:
        t = self.temperature if temperature is None else temperature
        return functional.dclw(z1, z2, t, sigma=self.sigma,
                               gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, sigma={self.sigma}, "
                f"gather_distributed={self.gather_distributed}")


class SogCLRLoss(torch.nn.Module):
    """SogCLR as a module, the per-sample estimator as buffer ``u`` (float32,
    (num_samples,)): saved in the state_dict, moved by ``.to()``, kept identical on every rank
    by the gathered update. See :func:`fastssl.functional.sogclr`.

    Args:
        num_samples: int >= 1, the dataset size (rows of ``u``).
        gamma: float in (0, 1]. temperature: float > 0.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).

    ``forward(z1, z2, index)``: (B, D) raw embeddings and the (B,) integer sample ids in
    [0, num_samples). Returns a 0-dim float32 tensor (float64 for float64); updates ``u``.

    Example::

        >>> loss_fn = fastssl.losses.SogCLRLoss(num_samples=len(dataset))
        >>> loss = loss_fn(z1, z2, index)
    """

    def __init__(self, num_samples: int, gamma: float = 0.9, temperature: float = 0.1,
                 gather_distributed: bool = False):
        super().__init__()
        check_int("num_samples", num_samples, minimum=1)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, lo_open=True)
        self.temperature = check_positive("temperature", temperature)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.register_buffer("u", torch.zeros(num_samples, dtype=torch.float32))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return functional.sogclr(
            z1,
            z2,
            index,
            self.u,
            gamma=self.gamma,
            temperature=self.temperature,
            gather_distributed=self.gather_distributed,
        )

    def extra_repr(self) -> str:
        return (f"num_samples={self.u.shape[0]}, gamma={self.gamma}, "
                f"temperature={self.temperature}, gather_distributed={self.gather_distributed}")


class SCELoss(torch.nn.Module):
    """SCE as a module with a FIFO queue of normalised keys (buffer ``queue`` (K, D),
    random normalised at init, and ``queue_ptr``). The loss uses the queue as it was before
    the call; the (gathered) keys of the call are enqueued afterwards. ``queue_size=0`` means
    no queue (then ``use_keys=True`` is needed). See :func:`fastssl.functional.sce`.

    Args:
        dim: int >= 1, the embedding width D. queue_size: int >= 0.
        coeff: float in [0, 1]. temperature, temperature_m: floats > 0.
        use_keys: bool, use the batch's keys as columns too.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).

    ``forward(q, k)``: (B, D) raw query (with gradient) and key embeddings. Returns a 0-dim
    float32 tensor (float64 for float64).

    Example::

        >>> loss_fn = fastssl.losses.SCELoss(dim=128, queue_size=65536)
        >>> loss = loss_fn(q, k)
    """

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
        self.use_keys = check_flag("use_keys", use_keys)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        size = self.queue.shape[0]
        # The loss keeps the queue for its backward: give it a snapshot, then enqueue in place.
        queue = self.queue.clone() if size > 0 else None
        loss = functional.sce(q, k, queue, coeff=self.coeff, temperature=self.temperature,
                      temperature_m=self.temperature_m, use_keys=self.use_keys,
                      gather_distributed=self.gather_distributed)
        if size > 0:
            self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: torch.Tensor) -> None:
        keys = normalize_rows(k.detach().float())  # no overflow at 1e20
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
