"""Memory the runtime may use: the container's cgroup limit when there is one, not the host's RAM.

A pod's memory limit is a cgroup limit; ``psutil.virtual_memory()`` reports the node's memory, so a KV
cache sized against it passes the check and the pod is OOM-killed. Here the available memory is the
smaller of the host's available memory and the cgroup's room, where the room is the limit minus the
memory in use that the kernel cannot reclaim (usage minus inactive page cache, as the kubelet's
"working set"):

- cgroup v2: ``memory.max`` ("max" = no limit), ``memory.current``, ``memory.stat`` (``inactive_file``)
- cgroup v1: ``memory/memory.limit_in_bytes`` (a huge value = no limit), ``memory/memory.usage_in_bytes``,
  ``memory/memory.stat`` (``total_inactive_file``)

The cgroup filesystem is read at ``/sys/fs/cgroup`` (``AUTOGLM_RUNTIME_CGROUP_ROOT`` overrides it; tests
point it at a fake directory). Torch-free: CUDA memory is asked by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CgroupMemory",
    "KV_MEMORY_FRACTION",
    "cgroup_memory",
    "checkpoint_bytes",
    "cpu_available_memory",
    "kv_bytes_per_token",
    "kv_cache_blocks",
]

CGROUP_ROOT_ENV = "AUTOGLM_RUNTIME_CGROUP_ROOT"
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a page-rounded 2**63-1


@dataclass(frozen=True)
class CgroupMemory:
    version: int  # 1 or 2
    limit: int  # bytes
    usage: int  # bytes, page cache included
    inactive_file: int  # reclaimable page cache

    @property
    def available(self) -> int:
        return max(0, self.limit - max(0, self.usage - self.inactive_file))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory(root: str | Path | None = None) -> CgroupMemory | None:
    """The memory limit of this process's cgroup, or None when there is none (or no cgroup fs)."""
    base = Path(root if root is not None else os.environ.get(CGROUP_ROOT_ENV, "/sys/fs/cgroup"))
    if (base / "memory.max").is_file():  # v2
        limit = _read_int(base / "memory.max")
        if limit is None:
            return None
        usage = _read_int(base / "memory.current") or 0
        return CgroupMemory(2, limit, usage, _stat(base / "memory.stat", "inactive_file"))
    v1 = base / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is None or limit >= _NO_LIMIT:
        return None
    usage = _read_int(v1 / "memory.usage_in_bytes") or 0
    return CgroupMemory(1, limit, usage, _stat(v1 / "memory.stat", "total_inactive_file"))


def cpu_available_memory(root: str | Path | None = None) -> int:
    """Bytes this process may still allocate in host memory: min(host available, cgroup room)."""
    import psutil

    host = int(psutil.virtual_memory().available)
    cg = cgroup_memory(root)
    return host if cg is None else min(host, cg.available)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K and V of one token position in every layer."""
    return 2 * num_layers * kv_heads * head_dim * itemsize


# Default share of the available memory the KV pool may take (vLLM's gpu_memory_utilization is 0.9 of
# the whole GPU; here it is of what is still free after the weights, and on CPU of the cgroup's room).
KV_MEMORY_FRACTION = {"cuda": 0.9, "cpu": 0.5}


def kv_cache_blocks(
    *,
    bytes_per_token: int,
    block_size: int,
    available: int | None,
    kv_cache_memory: int | None,
    default_tokens: int,
    min_tokens: int,
    fraction: float,
) -> int:
    """Blocks of the KV pool (block 0, the null block, included). ``kv_cache_memory`` (bytes) when given,
    else ``default_tokens`` positions capped at ``fraction`` of ``available``. Raises ValueError (naming the
    setting) when that is more than is available or holds fewer than ``min_tokens`` positions."""
    block_bytes = bytes_per_token * block_size
    if kv_cache_memory is not None:
        if available is not None and kv_cache_memory > available:
            raise ValueError(
                f"--kv-cache-memory is {kv_cache_memory / 2**30:.2f} GiB but {available / 2**30:.2f} GiB is available"
            )
        blocks = kv_cache_memory // block_bytes
    else:
        blocks = -(-default_tokens // block_size)
        if available is not None:
            blocks = min(blocks, int(fraction * available) // block_bytes)
    blocks += 1  # the null block
    if (blocks - 1) * block_size < min_tokens:
        have = f"{available / 2**30:.2f} GiB available" if available is not None else "no memory limit known"
        raise ValueError(
            f"the KV cache holds {(blocks - 1) * block_size} tokens ({block_bytes} bytes per block of {block_size}), "
            f"less than one sequence of max_model_len={min_tokens} ({have}); lower max_model_len or raise "
            f"--kv-cache-memory"
        )
    return blocks


def checkpoint_bytes(model_dir: str | Path, itemsize: int, checkpoint_itemsize: int) -> int:
    """Estimated bytes of a checkpoint's weights once loaded at ``itemsize`` bytes per parameter."""
    files = list(Path(model_dir).glob("*.safetensors")) or list(Path(model_dir).glob("*.bin"))
    size = sum(f.stat().st_size for f in files)
    return size * itemsize // max(1, checkpoint_itemsize)
