"""torch.distributed for `fercuda train` under torchrun, and a single process otherwise."""

from __future__ import annotations

import os

import torch

class Dist:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1), a single process otherwise."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg is None:
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_arg}: CUDA is not available on this machine")
        if self.world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        self.main = self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """Whether any rank says so: every rank must leave a loop at the same step, or DDP hangs."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max_spread(self, values: torch.Tensor) -> float:
        """The largest difference between ranks of any element of `values` (0.0 on one process)."""
        if self.world == 1:
            return 0.0
        values = values.to(self.device)
        hi, lo = values.clone(), values.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        return float((hi - lo).max()) if values.numel() else 0.0

    def close(self):
        if self.world > 1:
            torch.distributed.destroy_process_group()


def log(dist: Dist, *msg):
    if dist.main:
        print(*msg, flush=True)
