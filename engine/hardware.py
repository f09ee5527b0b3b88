"""Hardware presets: GPUs (training and serving) and other serving targets (edge, phone, CPU)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InputError
from engine.presets import load_yaml


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    kind: str                  # gpu | edge | phone | laptop | cpu
    memory_bytes: int          # what a model may use (GPU: total_memory torch reports)
    bandwidth_gbs: float
    bf16_tflops: float | None
    fp16_tflops: float | None
    fp8_tflops: float | None
    int8_tops: float | None
    price_per_hour: float | None
    arch: str = ""
    vendor: str = ""
    fp32_tflops: float | None = None   # CPUs that compute in fp32 (no fast bf16): their matmul rate
    alu_tops: float | None = None      # GPU: lane instructions issued per second (compute units x lanes x clock)
    reference_calibration: str = ""    # measurements the speed terms were fitted on (the reference GPU)
    os: str = ""                       # phone: ios | android (a runtime's terms may differ by platform)


    @property
    def has_bf16(self) -> bool:
        return bool(self.bf16_tflops)

    @property
    def has_fp8(self) -> bool:
        return bool(self.fp8_tflops)

    @property
    def matmul_tflops(self) -> float:
        """16-bit tensor peak (bf16, else fp16; fp32 for a CPU entry that computes in fp32)."""
        return float(self.bf16_tflops or self.fp16_tflops or self.fp32_tflops or 0.0)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _all() -> dict[str, Device]:
    out = {}
    for g in load_yaml("hardware/gpus.yaml"):
        out[g["id"]] = Device(id=g["id"], name=g["name"], kind="gpu", memory_bytes=int(g["usable_bytes"]),
                              bandwidth_gbs=g["bandwidth_gbs"], bf16_tflops=g["bf16_tflops"],
                              fp16_tflops=g["fp16_tflops"], fp8_tflops=g["fp8_tflops"],
                              int8_tops=g["int8_tops"], price_per_hour=g["price_per_hour"],
                              arch=g["arch"], vendor=g["vendor"], alu_tops=g.get("alu_tops"),
                              reference_calibration=g.get("reference_calibration", ""))
    for t in load_yaml("hardware/targets.yaml"):
        out[t["id"]] = Device(id=t["id"], name=t["name"], kind=t["kind"],
                              memory_bytes=int(t["memory_gb"] * 1e9 * t["usable_fraction"]),
                              bandwidth_gbs=t["bandwidth_gbs"], bf16_tflops=t["bf16_tflops"],
                              fp16_tflops=t["fp16_tflops"], fp8_tflops=t["fp8_tflops"],
                              int8_tops=t["int8_tops"], price_per_hour=t["price_per_hour"],
                              fp32_tflops=t.get("fp32_tflops"), os=t.get("os", ""))
    return out


_CACHE: dict[str, Device] = {}


def devices() -> dict[str, Device]:
    if not _CACHE:
        _CACHE.update(_all())
    return _CACHE


def gpu_ids() -> list[str]:
    return sorted(k for k, d in devices().items() if d.kind == "gpu")


def get(device_id: str, gpu_only: bool = False) -> Device:
    """Look up a device by preset id (case-insensitive); unknown ids list the known ones."""
    key = str(device_id).strip().lower()
    d = devices().get(key)
    if d is None or (gpu_only and d.kind != "gpu"):
        known = gpu_ids() if gpu_only else sorted(devices())
        raise InputError(f"unknown {'GPU' if gpu_only else 'device'} {device_id!r}; known: {', '.join(known)}",
                         field="gpu")
    return d
