"""Cluster specs for the planner: what one node holds and how fast its links are.

A spec is a small TOML file (``src/myriad/clusters/*.toml`` ship; any path works)::

    description = "one DGX H100"
    nodes = 1
    [gpu]
    name = "NVIDIA H100 SXM5 80GB"
    memory_gib = 80          # HBM per GPU
    bf16_tflops = 989        # dense bf16 peak per GPU
    [node]
    gpus = 8
    host_memory_gib = 2048   # CPU RAM per node
    cpu_cores = 112
    pcie_gbytes_per_s = 64   # host <-> one GPU, each direction
    gpu_link_gbytes_per_s = 450  # GPU <-> GPU inside the node (NVLink), each direction
    network_gbytes_per_s = 400   # node <-> network, all NICs together, each direction

Bandwidths are in GB/s (10^9 bytes) as data sheets give them; memory in GiB (2^30 bytes), which
is what the data sheets' "80GB" HBM and ``nvidia-smi`` mean. Every key is required so a spec
states all its assumptions; ``network_gbytes_per_s = 0`` marks a node type that is never
clustered (the planner then stays within one node).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from myriad.config import from_dict
from myriad.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GIB = 2**30
GB = 10**9


@dataclass(kw_only=True)
class GPUSpec:
    """One accelerator: its memory and its dense bf16 peak."""

    name: str
    memory_gib: float
    bf16_tflops: float


@dataclass(kw_only=True)
class NodeSpec:
    """One machine: its GPUs, host memory and CPU, and the bandwidth of each link."""

    gpus: int
    host_memory_gib: float
    cpu_cores: int
    pcie_gbytes_per_s: float
    gpu_link_gbytes_per_s: float
    network_gbytes_per_s: float


@dataclass(kw_only=True)
class ClusterSpec:
    """``nodes`` identical nodes; the planner also tries other node counts of the same type."""

    name: str
    description: str
    nodes: int
    gpu: GPUSpec
    node: NodeSpec

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.node.gpus


def shipped_clusters() -> list[str]:
    """Names of the cluster specs that ship inside the package."""
    folder = resources.files("myriad") / "clusters"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def cluster_path(name_or_path: str) -> Path:
    """Resolve a shipped spec name or a path to a TOML file."""
    if name_or_path in shipped_clusters():
        return Path(str(resources.files("myriad") / "clusters" / f"{name_or_path}.toml"))
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"cluster spec not found: {path}")
        return path
    raise UserError(
        f"unknown cluster {name_or_path!r}; shipped specs: {', '.join(shipped_clusters())}"
    )


def load_cluster(name_or_path: str) -> ClusterSpec:
    """Read, type-check and range-check a cluster spec; errors name the file and the key."""
    path = cluster_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    _require_all(ClusterSpec, raw, str(path), "")
    spec: ClusterSpec = from_dict(ClusterSpec, raw, where=str(path))
    _check_ranges(spec, str(path))
    return spec


def _require_all(cls: type, raw: dict[str, Any], where: str, prefix: str) -> None:
    """Every field is required: a missing one is reported with its full key."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in raw:
            raise UserError(f"{where}: missing key {key!r}")
        if f.name in _SECTIONS:
            if not isinstance(raw[f.name], dict):
                raise UserError(f"{where}: {key} must be a section (table), got {raw[f.name]!r}")
            _require_all(_SECTIONS[f.name], raw[f.name], where, f"{key}.")


_SECTIONS: dict[str, type] = {"gpu": GPUSpec, "node": NodeSpec}


def _check_ranges(spec: ClusterSpec, where: str) -> None:
    positive = {
        "nodes": spec.nodes,
        "gpu.memory_gib": spec.gpu.memory_gib,
        "gpu.bf16_tflops": spec.gpu.bf16_tflops,
        "node.gpus": spec.node.gpus,
        "node.host_memory_gib": spec.node.host_memory_gib,
        "node.cpu_cores": spec.node.cpu_cores,
        "node.pcie_gbytes_per_s": spec.node.pcie_gbytes_per_s,
        "node.gpu_link_gbytes_per_s": spec.node.gpu_link_gbytes_per_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{where}: {key} must be > 0, got {value!r}")
    network = spec.node.network_gbytes_per_s
    if network < 0:
        raise UserError(f"{where}: node.network_gbytes_per_s must be >= 0, got {network!r}")
    if spec.nodes > 1 and network == 0:
        raise UserError(f"{where}: node.network_gbytes_per_s is 0 but nodes = {spec.nodes}")
