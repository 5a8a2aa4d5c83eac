"""Several processes calibrating one model: the torch.distributed plumbing of the block loop.

`torchrun --nproc-per-node N -m calq compress …` (or `calq compress … --nproc N`) starts N processes, the ranks,
with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/MASTER_PORT in their environment. Every rank loads the model and
cuts the same calibration windows from the same seed, then keeps a contiguous share of the batches (`share`). The
engine sums the statistics of every rank's share (`sum_`, `max_`, `gather_lists`) so that each rank solves from
the whole calibration set, keeps the ranks' blocks identical (`sync_module`), and each rank carries only its share
of the calibration streams to the next block. Rank 0 writes the checkpoint and the report.

Failures: every collective here starts with `check`, an all-reduce of a failure flag. A rank that raises between
two collectives meets the others at their next check through `fail`, and every rank stops with that rank's message
(`PeerFailed` on the others) instead of waiting forever for it.

`join` returns `SOLO` when the process was not started that way: every collective is then the identity, and the
single-process path does no extra work.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from calq.errors import CalqError

# Ranks other than 0 wait at their first collective while rank 0 scores the dense model, and at the last while it
# writes and scores the checkpoint: hours for a large model on CPU. A rank that fails does not make the others
# wait this long (see `fail`); a killed one breaks gloo's and NCCL's connections at once.
TIMEOUT = timedelta(hours=12)
# Tests only: "RANK:BLOCK" makes that rank raise when it starts that block (tests/calibration/test_distributed.py).
FAIL_ENV = "CALQ_TEST_FAIL"


class PeerFailed(CalqError):
    """Another rank failed; carries its message and exit code."""

    def __init__(self, problem: str, fix: str, exit_code: int):
        super().__init__(problem, fix)
        self.exit_code = exit_code


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), before any group exists."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


class Solo:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of the rank's share of n batches: contiguous, so gathering in rank order is batch order."""
        r = self.rank if rank is None else rank
        return r * n // self.size, (r + 1) * n // self.size

    def share(self, items: list) -> list:
        a, b = self.bounds(len(items))
        return items[a:b]

    def check(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass

    def block_started(self, i: int) -> None:
        pass

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""

    def max_(self, tensors: list[torch.Tensor]) -> None:
        """Element-wise max of each tensor over the ranks, in place."""

    def total(self, n: int) -> int:
        return n

    def gather_lists(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (tensors inside must be on the CPU)."""
        return items

    def union(self, d: dict) -> dict:
        """The union of every rank's dict (ranks agree on shared keys)."""
        return d

    def broadcast(self, obj, src: int = 0):
        return obj

    def scatter(self, objs: list | None):
        """Rank 0's objs[r] on each rank r."""
        return objs[0]

    def gather(self, obj) -> list | None:
        """Every rank's obj on rank 0 (in rank order), None on the others."""
        return [obj]

    def sync_module(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers of module."""

    def assign(self, costs: list[float]) -> list[int]:
        """The rank that does each job, greedily by cost: the largest job goes to the least loaded rank."""
        load = [0.0] * self.size
        out = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: -costs[j]):     # stable: ties keep their order
            r = min(range(self.size), key=lambda r: load[r])
            out[j] = r
            load[r] += costs[j]
        return out


SOLO = Solo()


class Group(Solo):
    """torch.distributed's default process group: gloo for CPU tensors, NCCL for CUDA ones."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        fail = os.environ.get(FAIL_ENV, "")
        self._fail_at = tuple(int(x) for x in fail.split(":")) if fail else None
        atexit.register(self._close)

    def _close(self) -> None:
        # A rank that exits first must not take the others down with it: torchrun stops every rank once one has
        # ended with an error, which could cut rank 0 off before it prints the run's one error line.
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:       # a peer is gone already: nothing left to wait for
            pass

    def block_started(self, i: int) -> None:
        if self._fail_at == (self.rank, i):
            raise CalqError(f"test failure injected on rank {self.rank} at block {i} ({FAIL_ENV})",
                            f"unset {FAIL_ENV}")

    def check(self) -> None:
        self._agree(None)

    def fail(self, exc: BaseException) -> None:
        """Tell the other ranks, waiting at their next check, that this one failed (they raise PeerFailed)."""
        try:
            self._agree(exc)
        except Exception:       # the group is broken (a peer died): the others learn it from their sockets
            pass

    def _agree(self, exc: BaseException | None) -> None:
        flag = torch.tensor([0 if exc is None else 1])
        dist.all_reduce(flag)
        if int(flag) == 0:
            return
        note = None
        if exc is not None:
            note = (exc.problem, exc.fix, exc.exit_code) if isinstance(exc, CalqError) else \
                (f"{type(exc).__name__}: {exc}", "rerun with --debug for the traceback", 1)
        notes = [None] * self.size
        dist.all_gather_object(notes, note)
        if exc is not None:
            return          # the failing rank raises its own exception
        r, (problem, fix, code) = next((r, n) for r, n in enumerate(notes) if n is not None)
        raise PeerFailed(f"rank {r} of {self.size} failed: {problem}", fix, code)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        self.check()
        for t in tensors:
            dist.all_reduce(t)

    def max_(self, tensors: list[torch.Tensor]) -> None:
        self.check()
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def total(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        self.sum_([t])
        return int(t)

    def gather_lists(self, items: list) -> list:
        self.check()
        parts = [None] * self.size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def union(self, d: dict) -> dict:
        self.check()
        parts = [None] * self.size
        dist.all_gather_object(parts, d)
        out = {}
        for part in parts:
            out.update(part)
        return out

    def broadcast(self, obj, src: int = 0):
        self.check()
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def scatter(self, objs: list | None):
        self.check()
        box = [None]
        dist.scatter_object_list(box, objs if self.rank == 0 else None, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        self.check()
        parts = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def sync_module(self, module: torch.nn.Module) -> None:
        # On CPU the ranks compute bit-identical blocks already; on GPUs training kernels with atomics need not.
        self.check()
        for t in [*module.parameters(), *module.buffers()]:
            if not t.is_meta:           # a block on disk (--offload disk) is read from the same files by all
                dist.broadcast(t.data, src=0)


def join(device: torch.device) -> tuple[Solo, torch.device]:
    """The process group torchrun's environment describes (SOLO without one), and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SOLO, device
    if device.type not in ("cpu", "cuda"):
        raise CalqError(f"a run over several processes computes on cpu or cuda, not {device.type}",
                        "use --device cpu or --device cuda")
    if device.type == "cuda":
        if device.index is not None:
            raise CalqError(f"--device {device} under torchrun: each rank takes the GPU of its LOCAL_RANK",
                            "use --device cuda (or auto)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # object collectives and the failure flag go through gloo on CPU; CUDA statistics through NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size()), device
