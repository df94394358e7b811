"""Hugging Face safetensors files: the one reader (sliced, lazy) and the one writer (planned, streaming).

No megatron, no collectives: used by the bridge's load and export (`models/hf_export.py`), the merge and the
LoRA merge (`export/`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from llamafactory_mca.checkpoint import CheckpointError

ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TO_TORCH = {v: k for k, v in ST_DTYPE.items()}
# safetensors' own `save_file` lays a file out by descending dtype (this order of its Dtype enum), then by name
_SAVE_FILE_DTYPE_RANK = {d: i for i, d in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64",
                                                      "I64"))}


def parse_size(size: Union[int, str]) -> int:
    """Bytes of a size given as an int or a string such as '5GB', '100KB', '2.5 GiB' (powers of 10, as
    transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r}; use e.g. '5GB'")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


class SafetensorsReader:
    """Lazy, sliced access to a Hugging Face checkpoint's safetensors shards (the one reader of HF weights:
    the bridge's load and the LoRA merge's base model). FileNotFoundError without safetensors weights."""

    max_open = 2

    def __init__(self, path: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path}: the Megatron backend loads "
                "Hugging Face safetensors checkpoints only"
            )
        self._files: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        """Whether the checkpoint holds tensor `name`."""
        return name in self.weight_map

    def _file(self, name: str):
        if self.resolve(name) not in self.weight_map:
            raise KeyError(f"{name} not found in the checkpoint at {self.path}")
        fname = self.file_of(name)
        if fname in self._files:
            self._files[fname] = self._files.pop(fname)  # most recently used last
        else:
            # keep few shard files mapped: their touched pages count as this process' RSS
            while len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files)))
            self._files[fname] = self._safe_open(os.path.join(self.path, fname), "pt")
        return self._files[fname]

    def file_of(self, name: str) -> str:
        """The shard file (relative to the checkpoint directory) holding tensor `name`; families whose
        checkpoints use other names override `resolve`, not this."""
        return self.weight_map[self.resolve(name)]

    def resolve(self, name: str) -> str:
        """The name tensor `name` is stored under (the identity; see `qwen2_vl.CompatReader`)."""
        return name

    def tensor_index(self) -> dict[str, tuple[tuple, torch.dtype]]:
        """{name: (shape, dtype)} of every tensor, shard files in sorted order, tensors in file order."""
        out: dict[str, tuple[tuple, torch.dtype]] = {}
        for fname in sorted(set(self.weight_map.values())):
            with self._safe_open(os.path.join(self.path, fname), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (tuple(sl.get_shape()), ST_TO_TORCH[sl.get_dtype()])
        return out

    def shape(self, name: str) -> list[int]:
        """The full shape of tensor `name`."""
        return list(self._file(name).get_slice(self.resolve(name)).get_shape())

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Tensor `name`, or its rows (`dim=0`) / columns (`dim=1`) start:stop."""
        sl = self._file(name).get_slice(self.resolve(name))
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise ValueError(dim)

    def close(self) -> None:
        """Unmap the open shard files."""
        self._files.clear()


@dataclass
class PlannedTensor:
    """Where the writer puts one tensor: shard file index and byte range in its data section."""

    name: str
    shape: tuple
    dtype: torch.dtype
    shard: int
    begin: int
    end: int


class StreamingSafetensorsWriter:
    """Safetensors shards whose headers are written first, then each tensor at its offset, in any order.

    The one safetensors writer of Hugging Face models (merge, LoRA merge, and the bridge's export at the end of
    training). `specs`: (name, shape, dtype) of every tensor, in the order they are laid out; a new shard starts
    where the next tensor would push the current one past `max_shard_size` bytes. `close()` checks that every
    planned tensor was written and writes `model.safetensors.index.json` when there are several shards.
    `save_file_layout`: inside each shard, lay the tensors out as safetensors' `save_file` does (descending dtype,
    then name), so the files are byte for byte those `save_file` writes for the same shards.
    """

    def __init__(self, out_dir: str, specs: Sequence[tuple[str, tuple, torch.dtype]], max_shard_size: int,
                 save_file_layout: bool = False):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = numel(shape) * itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        if save_file_layout:
            for shard in shards:
                shard.sort(key=lambda t: (-_SAVE_FILE_DTYPE_RANK[ST_DTYPE[t[2]]], t[0]))
        n = len(shards)
        self.files = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.plan: dict[str, PlannedTensor] = {}
        self.data_start: list[int] = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                if name in self.plan:
                    raise CheckpointError(f"the bridge maps two tensors to the same Hugging Face name {name!r}")
                header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.plan[name] = PlannedTensor(name, shape, dtype, i, offset, offset + nbytes)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            with open(os.path.join(out_dir, self.files[i]), "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            self.data_start.append(8 + len(raw))
            self.total_size += offset
        self.written: set[str] = set()
        self._handles: dict[int, Any] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write planned tensor `name` (its shape and dtype as planned) at its place."""
        p = self.plan.get(name)
        if p is None:
            raise CheckpointError(f"tensor {name!r} was not planned (the bridge's mapping is not deterministic)")
        if tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise CheckpointError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {p.shape} {p.dtype}")
        if name in self.written:
            raise CheckpointError(f"tensor {name!r} written twice")
        f = self._handles.get(p.shard)
        if f is None:
            for h in self._handles.values():
                h.close()
            self._handles = {p.shard: open(os.path.join(self.out_dir, self.files[p.shard]), "r+b")}
            f = self._handles[p.shard]
        f.seek(self.data_start[p.shard] + p.begin)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        self.written.add(name)

    def abort(self) -> None:
        """Close the files without checks (the caller removes the directory)."""
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def close(self) -> None:
        """Flush and fsync the shards, check that every planned tensor was written, write the index."""
        for h in self._handles.values():
            h.flush()
            os.fsync(h.fileno())
            h.close()
        self._handles = {}
        missing = set(self.plan) - self.written
        if missing:
            raise CheckpointError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[:3]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[p.shard] for name, p in sorted(self.plan.items())}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of `shape`."""
    n = 1
    for s in shape:
        n *= int(s)
    return n


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype`."""
    return torch.empty((), dtype=dtype).element_size()
