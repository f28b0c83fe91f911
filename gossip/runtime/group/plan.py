"""Which samples each minitask covers: a node's shard, the :class:`DataPlan` (a pure function of
its spec, so master and workers cut the same pieces) and the full-batch reference gradient."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import torch
from torch import nn

from ...algorithms.coding import make_code
from ...algorithms.sgc import msgc_d1_fraction
from ...errors import ConfigError
from ...layout import ParamLayout
from ...tasks import Task, partition

SHARD_KEYS = ("nodes", "rank", "scheme", "alpha", "seed")


def shard_ids(total: int, labels, shard: dict) -> np.ndarray:
    """Sample ids of one gossip node's shard: ``gossip.tasks.partition(...)[rank]``.

    ``shard = {"nodes": N, "rank": r}`` plus optional ``scheme`` (``"iid"`` or ``"dirichlet"``),
    ``alpha`` and ``seed``, as ``gossip run`` splits a task over its nodes. Example:
    ``shard_ids(1437, None, {"nodes": 4, "rank": 1})``.
    """
    bad = sorted(set(shard) - set(SHARD_KEYS))
    nodes, rank = shard.get("nodes"), shard.get("rank")
    if bad or not isinstance(nodes, int) or not isinstance(rank, int) or not 0 <= rank < nodes:
        raise ConfigError(f"shard={shard!r}; need {{'nodes': N, 'rank': 0..N-1}} and optionally "
                          f"'scheme', 'alpha', 'seed' (unknown keys: {bad})")  # fmt: skip
    parts = partition(shard.get("scheme", "iid"), num_samples=total, labels=labels, nodes=nodes,
                      alpha=shard.get("alpha", 1.0), seed=shard.get("seed", 0))  # fmt: skip
    return np.asarray(parts[rank], dtype=np.int64)


class DataPlan:
    """The split of a training set (or one node's ``shard`` of it) into minitasks; a pure
    function of its spec, so master and workers cut the same pieces.

    A seeded permutation of the sample ids is cut into:

    - ``gc=(scheme, s, code_seed)``: ``n`` partitions coded by an ``(n, s)`` gradient code (the
      task ``("gc", 0)``: worker ``i`` encodes the partial gradients of ``assignment[i]``);
    - ``msgc={"B", "W", "lam", "scheme", "code_seed"}``: M-SGC's repetition part D1 in
      ``n (W - 1)`` chunks (task ``("d1", c)``) and its coded part D2 in ``B`` groups of ``n``
      partitions under an ``(n, lam)`` code (task ``("d2", g)``).

    ``total`` is the training set's size; ``samples`` the number of ids in the plan (the shard's
    size, or ``total``). ``labels`` (the task's groups) are only needed for a Dirichlet shard.
    Example: ``DataPlan(1437, 8, gc=("frc", 1, 0)).gc_parts[3]`` are partition 3's sample ids.
    """

    def __init__(self, total: int, n: int, *, gc=None, msgc=None, seed: int = 0, shard=None,
                 labels=None):  # fmt: skip
        self.total, self.n, self.seed = int(total), int(n), int(seed)
        self.shard = dict(shard) if shard else None
        self.ids = shard_ids(total, labels, self.shard) if shard else np.arange(self.total)
        self.samples = len(self.ids)
        if self.samples < n:
            raise ConfigError(f"{self.samples} samples cannot be split over n_workers={n}")
        self.gc, self.msgc = (list(gc) if gc else None), (dict(msgc) if msgc else None)
        perm = self.ids[np.random.default_rng(self.seed).permutation(self.samples)]
        self.gc_code = self.lam_code = None
        self.gc_parts = self.d1_chunks = self.d2_groups = None
        if gc:
            self.gc_code = make_code(gc[0], n, gc[1], gc[2])
            self.gc_parts = np.array_split(perm, n)
        if msgc:
            B, W, lam = msgc["B"], msgc["W"], msgc["lam"]
            n1 = int(round(msgc_d1_fraction(n, B, W, lam) * self.samples))
            self.d1_chunks = np.array_split(perm[:n1], n * (W - 1))
            self.d2_groups = [np.array_split(g, n) for g in np.array_split(perm[n1:], B)]
            if lam < n:
                self.lam_code = make_code(msgc["scheme"], n, lam, msgc["code_seed"])

    def spec(self) -> dict:
        return {"total": self.total, "n": self.n, "gc": self.gc, "msgc": self.msgc,
                "seed": self.seed, "shard": self.shard}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict, labels=None) -> DataPlan:
        return cls(spec["total"], spec["n"], gc=spec["gc"], msgc=spec["msgc"], seed=spec["seed"],
                   shard=spec["shard"], labels=labels)  # fmt: skip

    @property
    def digest(self) -> str:
        """SHA-256 of the spec, the sample ids and the codes' matrices (equal on every process)."""
        h = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.ids, dtype="<i8").tobytes())
        for code in (self.gc_code, self.lam_code):
            h.update((code.digest if code is not None else "-").encode())
        return h.hexdigest()

    def pieces(self, part: str, index: int, worker: int):
        """``(code or None, {partition: sample ids})`` that ``worker`` computes for a task."""
        if part == "gc":
            return self.gc_code, {j: self.gc_parts[j] for j in self.gc_code.assignment[worker]}
        if part == "d1":
            return None, {0: self.d1_chunks[index]}
        if part == "d2":
            parts = self.d2_groups[index]
            return self.lam_code, {j: parts[j] for j in self.lam_code.assignment[worker]}
        raise ConfigError(f"task part={part!r} is unknown; valid: gc, d1, d2")


def full_batch_gradient(task: Task, params: torch.Tensor, model: nn.Module | None = None,
                        dtype: torch.dtype = torch.float64, ids=None) -> torch.Tensor:  # fmt: skip
    """The single-process reference: mean-loss gradient over the whole training set (or the
    sample ``ids``) at the flat parameters ``params`` (layout order of ``model`` or
    ``task.model_fn()``), computed in ``dtype``."""
    m = copy.deepcopy(model) if model is not None else task.model_fn()
    m = m.to(dtype)
    ParamLayout.from_module(m).bind_(m, params.detach().to(dtype).clone())
    x, y = task.train
    if ids is not None:
        x, y = x[torch.as_tensor(ids)], y[torch.as_tensor(ids)]
    y = y if task.classification else y.to(dtype)
    task.loss_fn(m(x.to(dtype)), y).backward()
    return m._gossip_flat_grad.clone()
