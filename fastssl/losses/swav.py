"""SwAVLoss: the swapped-prediction loss with upstream's embedding queue as module state."""
from __future__ import annotations

from typing import Sequence

import torch

from fastssl._validation import (check_embeddings, check_flag, check_int, check_positive,
                                 check_same_device, check_views)
from fastssl.functional.swav import freeze_prototypes_grad, normalize_prototypes_, swav

__all__ = ["SwAVLoss", "normalize_prototypes_", "freeze_prototypes_grad"]

# A call in lightly's form, criterion(high_resolution_outputs, low_resolution_outputs[,
# queue_outputs]), lands the low-resolution crops in `embeddings` and the queue in `prototypes`:
# silently wrong without this check (the crops and the queue would be ignored).
_LIGHTLY_HINT = ("; this looks like lightly's SwaVLoss call criterion(high_resolution_outputs, "
                 "low_resolution_outputs[, queue_outputs]): use "
                 "fastssl.compat.lightly.SwaVLoss for that form, or pass every crop in one list, "
                 "SwAVLoss(n_assign_crops=len(high))(high + low)")


def _is_sequence(x) -> bool:
    return isinstance(x, (list, tuple))


class SwAVLoss(torch.nn.Module):
    """SwAV loss (facebookresearch/swav) with its optional queue; see
    :func:`fastssl.functional.swav` for the loss itself.

    Args:
        temperature, epsilon: floats > 0. sinkhorn_iterations: int >= 0 (0: the
            normalisation only, as lightly and SwAV).
        n_assign_crops: int >= 1 (at most the number of crops at forward).
        queue_length: int >= 0 rows per assigned crop (per rank); 0 means no queue.
        gather_distributed: bool, as in the functional loss (Sinkhorn over all ranks' rows,
            global-batch value, DDP-exact gradient). The queue stays per rank, as upstream.

    ``forward(scores, embeddings=None, prototypes=None)`` returns a 0-dim float32 tensor
    (float64 for float64 scores):

    * `scores`: list of (B, K) prototype scores, one per crop, the assigned crops first.
    * `embeddings`: the normalised (B, D) embeddings the scores came from, a list with one per
      crop (at least the first `n_assign_crops`) or one crop-major (n_crops * B, D) tensor.
      Needed only with a queue (``queue_length > 0``): they are what the queue stores.
    * `prototypes`: the current prototype weight (K, D) (or the ``nn.Linear`` holding it),
      required at every call when ``queue_length > 0`` (checked from the first call): once the
      queue is full, the stored embeddings are rescored with it, as upstream does.

    A call in lightly's list form (``criterion(high, low[, queue])``) raises a ``TypeError``
    naming the argument: that form is :class:`fastssl.compat.lightly.SwaVLoss`.

    Queue (as upstream, per rank): a buffer ``queue`` of shape (n_assign_crops,
    queue_length, D), created at the first forward that brings embeddings, FIFO (the newest B
    embeddings of assigned crop i at the front of ``queue[i]``). Each step, for assigned crop
    i: if the queue was full before this step, ``queue[i] @ prototypes.T`` is prepended to
    crop i's scores for Sinkhorn (only the last B codes are kept); then crop i's embeddings
    are pushed. ``queue_count`` (a buffer) counts the rows written, so a queue restored from
    a checkpoint resumes where it stopped. Start the queue later in training by creating the
    loss (or calling :meth:`reset_queue`) at that epoch.

    Example::

        >>> loss_fn = fastssl.losses.SwAVLoss(queue_length=3840)
        >>> loss = loss_fn(scores, embeddings=emb, prototypes=model.prototypes)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        n_assign_crops: int = 2,
        queue_length: int = 0,
        gather_distributed: bool = False,
    ):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.epsilon = check_positive("epsilon", epsilon)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=0)
        self.n_assign_crops = check_int("n_assign_crops", n_assign_crops, minimum=1)
        self.queue_length = check_int("queue_length", queue_length, minimum=0)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        # (n_assign_crops, queue_length, D) once D is known; empty until then
        self.register_buffer("queue", torch.zeros(0))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.int64))
        self._count = 0  # host mirror of queue_count: the full/not-full decision needs no sync

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"n_assign_crops={self.n_assign_crops}, queue_length={self.queue_length}, "
            f"gather_distributed={self.gather_distributed}"
        )

    @property
    def queue_full(self) -> bool:
        return self.queue_length > 0 and self._count >= self.queue_length

    def reset_queue(self) -> None:
        """Empty the queue (the next steps fill it again before it is used)."""
        self.queue = torch.zeros(0, device=self.queue.device)
        self.queue_count.zero_()
        self._count = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the queue's width D is only known once embeddings were seen: take the stored shape
        key = prefix + "queue"
        if key in state_dict and state_dict[key].shape != self.queue.shape:
            self.queue = torch.zeros_like(state_dict[key], device=self.queue.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.queue_count)  # one host read at load time, not per step

    def _assigned_embeddings(self, embeddings, bs: int, n_crops: int) -> list[torch.Tensor]:
        if embeddings is None:
            raise ValueError(
                "embeddings: required when queue_length > 0 (the queue stores them), got None"
            )
        if isinstance(embeddings, torch.Tensor):
            check_embeddings("embeddings", embeddings)
            if embeddings.shape[0] not in (bs * n_crops, bs * self.n_assign_crops):
                raise ValueError(
                    f"embeddings: expected {n_crops} (or {self.n_assign_crops}) crop-major blocks "
                    f"of {bs} rows, got shape {tuple(embeddings.shape)}"
                )
            return [embeddings[i * bs:(i + 1) * bs] for i in range(self.n_assign_crops)]
        emb = check_views("embeddings", embeddings, min_views=self.n_assign_crops)
        if emb[0].shape[0] != bs:
            raise ValueError(f"embeddings[0]: expected {bs} rows (the batch of scores), "
                             f"got shape {tuple(emb[0].shape)}")
        return emb[:self.n_assign_crops]

    def _prototype_weight(self, prototypes, K: int, D: int, ref: torch.Tensor) -> torch.Tensor:
        """The (K, D) prototype weight, checked at every call with a queue (also before the
        queue is full, so that a missing argument fails at the first call, not steps later)."""
        if prototypes is None:
            raise ValueError("prototypes: required when queue_length > 0 (once the queue is "
                             "full, the queued embeddings are rescored with the current "
                             "prototypes), got None")
        weight = prototypes.weight if isinstance(prototypes, torch.nn.Module) else prototypes
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"prototypes: expected a (K, D) tensor or the nn.Linear holding it, "
                            f"got {type(prototypes).__name__}")
        check_embeddings("prototypes", weight)
        if weight.shape != (K, D):
            raise ValueError(f"prototypes: expected shape ({K}, {D}) (K prototypes of the "
                             f"embeddings' width), got {tuple(weight.shape)}")
        check_same_device([("scores[0]", ref), ("prototypes", weight)])
        return weight

    @torch.no_grad()
    def _queue_scores(self, weight: torch.Tensor) -> list[torch.Tensor]:
        w = weight.detach().to(self.queue.dtype)
        return [self.queue[i] @ w.t() for i in range(self.n_assign_crops)]

    @torch.no_grad()
    def _push(self, emb: list[torch.Tensor]) -> None:
        bs = emb[0].shape[0]
        if bs > self.queue_length:
            raise ValueError(
                f"queue_length: expected at least the batch size {bs}, got {self.queue_length}"
            )
        D = emb[0].shape[1]
        if self.queue.dim() != 3:
            dtype = torch.float64 if emb[0].dtype == torch.float64 else torch.float32
            self.queue = torch.zeros(self.n_assign_crops, self.queue_length, D, dtype=dtype,
                                     device=emb[0].device)
        elif self.queue.shape[2] != D:
            raise ValueError(
                f"embeddings: expected width {self.queue.shape[2]} (the queue's), got {D}"
            )
        # FIFO: shift everything back by one batch, newest batch at the front
        self.queue[:, bs:] = self.queue[:, :-bs].clone()
        for i, e in enumerate(emb):
            self.queue[i, :bs] = e.detach().to(self.queue.dtype)
        self._count = min(self._count + bs, self.queue_length)
        self.queue_count.fill_(self._count)

    def _check_argument_types(self, embeddings, prototypes) -> None:
        if _is_sequence(prototypes):
            raise TypeError(f"prototypes: expected a (K, D) tensor or the nn.Linear holding it, "
                            f"got a {type(prototypes).__name__}" + _LIGHTLY_HINT)
        if not (prototypes is None or isinstance(prototypes, (torch.Tensor, torch.nn.Module))):
            raise TypeError(f"prototypes: expected a (K, D) tensor or the nn.Linear holding it, "
                            f"got {type(prototypes).__name__}")
        if not (embeddings is None or isinstance(embeddings, torch.Tensor)
                or _is_sequence(embeddings)):
            raise TypeError(f"embeddings: expected a list of (B, D) tensors or one (n_crops * "
                            f"B, D) tensor, got {type(embeddings).__name__}")
        if _is_sequence(embeddings) and self.queue_length == 0:
            # without a queue the embeddings are not used: a list here is lightly's
            # low-resolution crops, which would be ignored
            raise TypeError(f"embeddings: a {type(embeddings).__name__} given to "
                            f"SwAVLoss(queue_length=0), which uses no embeddings"
                            + _LIGHTLY_HINT)

    @staticmethod
    def _looks_like_crops(embeddings, scores) -> bool:
        """A list of (B, K) tensors as wide as the scores: lightly's low-resolution crops."""
        return (_is_sequence(embeddings) and len(embeddings) > 0
                and all(isinstance(e, torch.Tensor) and e.shape == scores[0].shape
                        for e in embeddings))

    def forward(
        self, scores: Sequence[torch.Tensor], embeddings=None, prototypes=None
    ) -> torch.Tensor:
        views = check_views("scores", scores, min_views=2)
        self._check_argument_types(embeddings, prototypes)
        if self.n_assign_crops > len(views):
            raise ValueError(f"n_assign_crops: expected at most the number of crops {len(views)}, "
                             f"got {self.n_assign_crops}")
        queue_scores = None
        if self.queue_length > 0:
            bs, K = views[0].shape
            if prototypes is None and self._looks_like_crops(embeddings, views):
                raise TypeError("prototypes: required with queue_length > 0, got None, and "
                                "embeddings are (B, K) tensors like the scores" + _LIGHTLY_HINT)
            emb = self._assigned_embeddings(embeddings, bs, len(views))
            check_same_device(
                [("scores[0]", views[0])] + [(f"embeddings[{i}]", e) for i, e in enumerate(emb)]
            )
            if bs > self.queue_length:
                raise ValueError(f"queue_length: expected at least the batch size {bs}, "
                                 f"got {self.queue_length}")
            weight = self._prototype_weight(prototypes, K, emb[0].shape[1], views[0])
            if self.queue_full:
                queue_scores = self._queue_scores(weight)
            self._push(emb)
        return swav(views, n_assign_crops=self.n_assign_crops, temperature=self.temperature,
                    epsilon=self.epsilon, sinkhorn_iterations=self.sinkhorn_iterations,
                    queue_scores=queue_scores, gather_distributed=self.gather_distributed)
