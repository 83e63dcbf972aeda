"""Accelerators `--plan` compiles for, by the names users rent them under, and their compile-only devices.

A target is a device count and kind, not hardware at hand: libtpu (the `jax[tpu]` extra) and the CUDA plugin (the
`jax[cuda13-local]` extra) both describe a topology from which XLA compiles exactly as on the real machine, here,
with no accelerator. The numbers below are the vendors' datasheets: memory per device and dense bf16 peak (the peak
comes from dsjax.train.metrics.PEAK_FLOPS, the table MFU uses during training).

Names: Cloud TPU accelerator types as `gcloud` takes them. For v4 and v5p the number counts TensorCores, two per
chip, and JAX drives each chip as one device (megacore): `v5p-128` is 64 chips in a 4x4x4 torus, 16 hosts of 4.
For v5e (`v5litepod-N`, alias `v5e-N`) and v6e the number counts chips. NVIDIA: `h100xN`, `h200xN` for N SXM GPUs,
8 per host. `cpu`: this host's CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N makes N), for tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from dsjax.errors import ConfigError

GB = 10**9
GiB = 2**30

TPU_EXTRA = 'pip install "jax[tpu]==0.10.2"'
GPU_EXTRA = 'pip install "jax[cuda13-local]==0.10.2" "nvidia-cuda-nvcc==13.5.37"'

# Chips -> torus shape, as Cloud TPU lays out slices (tpu/docs/v4, v5p: 3D; v5e, v6e: 2D).
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    names: tuple[str, ...]  # accelerator-type prefixes, the first canonical
    libtpu_name: str        # what libtpu's topology_name starts with
    memory_bytes: int       # HBM per chip, datasheet
    cores_per_chip: int     # how many of the accelerator type's number make one JAX device
    tori: dict
    chip_config: str | None = None


TPU_FAMILIES = (
    TpuFamily(("v4",), "v4", 32 * GiB, 2, TORUS_3D, chip_config="megacore"),
    TpuFamily(("v5p",), "v5p", 95 * GiB, 2, TORUS_3D),
    TpuFamily(("v5litepod", "v5e"), "v5e", 16 * GiB, 1, TORUS_2D),
    TpuFamily(("v6e",), "v6e", 32 * GiB, 1, TORUS_2D),
)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The device description XLA's GPU compiler reads (stream_executor.GpuTargetConfigProto), from datasheets:
    NVIDIA H100 Tensor Core GPU datasheet and architecture whitepaper (SXM5: 132 SMs, 228 KiB shared memory per SM,
    227 KiB per block opt-in, 50 MiB L2, 1.98 GHz boost, compute capability 9.0), H200 datasheet (141 GB HBM3e,
    4.8 TB/s), and the memory: H100 SXM 80 GB HBM3 at 3.35 TB/s."""

    name: str
    memory_bytes: int
    memory_bandwidth: int  # bytes/s
    sm_count: int = 132
    clock_ghz: float = 1.98
    l2_bytes: int = 50 * 2**20
    shared_per_sm: int = 228 * 1024
    shared_per_block_optin: int = 227 * 1024
    compute_capability: tuple[int, int] = (9, 0)

    def target_config(self) -> str:
        """GpuTargetConfigProto text (jax 0.10.2's parser rejects `collective_memory_granularity`, so none)."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  device_vendor: "NVIDIA Corporation"
  name: "{self.name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{self.name}"
"""


GPU_SPECS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", memory_bytes=80 * GB, memory_bandwidth=3_350 * GB),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", memory_bytes=141 * GB, memory_bandwidth=4_800 * GB),
}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str            # tpu, gpu or cpu
    devices_count: int
    memory_bytes: int | None  # per device; None: unknown (cpu without an override)
    describe: str             # one phrase for the report: "64 TPU v5p chips (4x4x4, megacore)"
    topology: str = ""
    chip_config: str | None = None
    gpu: GpuSpec | None = None

    def devices(self) -> list:
        """The target's devices: compile-only for TPU and GPU (no hardware needed), this host's for `cpu`."""
        import jax

        if self.platform == "cpu":
            return list(jax.devices("cpu"))
        from jax.experimental import topologies

        if self.platform == "tpu":
            try:
                kwargs = {"chip_config_name": self.chip_config} if self.chip_config else {}
                return list(topologies.get_topology_desc(platform="tpu", topology_name=self.topology,
                                                         **kwargs).devices)
            except RuntimeError as err:
                if "not installed" in str(err):
                    raise ConfigError(f"--plan={self.name} needs the TPU compiler, which is not installed: "
                                      f"{TPU_EXTRA} (an optional extra, not in requirements.txt).") from None
                raise
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no GPU, no driver: compile only
        try:
            return list(topologies.get_topology_desc(platform="cuda", target_config=self.gpu.target_config(),
                                                     topology=self.topology).devices)
        except (NotImplementedError, RuntimeError) as err:
            raise ConfigError(f"--plan={self.name} needs the CUDA compiler, which is not installed or failed to load "
                              f"({str(err).splitlines()[0][:120]}): {GPU_EXTRA} (an optional extra, not in "
                              "requirements.txt).") from None


def known_names() -> list[str]:
    tpu = [f"{n}-{chips * f.cores_per_chip}" for f in TPU_FAMILIES for n in f.names for chips in f.tori]
    gpu = [f"{g}x{n}" for g in GPU_SPECS for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    return tpu + gpu + ["cpu"]


def _unknown(name: str, why: str = "") -> ConfigError:
    if why:
        return ConfigError(f"--plan={name}: {why}.")
    close = difflib.get_close_matches(name.lower(), known_names(), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"--plan={name} is not a known target{hint}; targets are Cloud TPU types (v4-128, v5p-128, "
                       "v5litepod-256 or v5e-256, v6e-256), NVIDIA h100xN / h200xN (8 per host), or cpu.")


def lookup(name: str, cpu_devices: int | None = None) -> Target:
    """The target called `name`; a typo gets a ConfigError with the closest known name."""
    key = name.strip().lower()
    if key == "cpu":
        return Target("cpu", "cpu", cpu_devices or 0, None, "this host's CPU devices")
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", key)
    if match:
        prefix, count = match.group(1), int(match.group(2))
        for family in TPU_FAMILIES:
            if prefix in family.names:
                chips, rest = divmod(count, family.cores_per_chip)
                if rest or chips not in family.tori:
                    valid = ", ".join(f"{family.names[0]}-{c * family.cores_per_chip}" for c in family.tori)
                    raise _unknown(name, f"{count} is not a {family.names[0]} slice size (one of {valid})")
                torus = family.tori[chips]
                config = f", {family.chip_config}" if family.chip_config else ""
                return Target(f"{family.names[0]}-{count}", "tpu", chips, family.memory_bytes,
                              f"{chips} TPU {family.libtpu_name} chips ({torus}{config})",
                              topology=f"{family.libtpu_name}:{torus}", chip_config=family.chip_config)
    match = re.fullmatch(r"([a-z0-9]+)x(\d+)", key)
    if match and match.group(1) in GPU_SPECS and int(match.group(2)) > 0:
        gpu, count = GPU_SPECS[match.group(1)], int(match.group(2))
        per_host = min(count, GPUS_PER_HOST)
        if count % per_host:
            raise _unknown(name, f"{count} GPUs do not fill hosts of {GPUS_PER_HOST}")
        hosts = count // per_host
        return Target(key, "gpu", count, gpu.memory_bytes, f"{count} x {gpu.name} ({hosts} host"
                      f"{'s' if hosts > 1 else ''} of {per_host})", topology=f"1x{hosts}x{per_host}", gpu=gpu)
    raise _unknown(name)
