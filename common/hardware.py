"""GPU detection, precision choice and memory readings. The one precision rule: `python -m common.hardware` prints what
it decides (./run.sh --detect)."""
from dataclasses import dataclass

import torch

from common.errors import UserError


@dataclass
class Hardware:
    gpu_name: str | None  # None without a CUDA GPU
    capability: str | None  # "8.0" for an A100, "7.5" for a T4
    precision: str  # what the trainer is asked for: bf16, fp16 or fp32 (on CPU Unsloth may compute in bf16 anyway)

    def describe(self) -> str:
        if self.gpu_name:
            return f"gpu={self.gpu_name}, precision={self.precision}"
        return f"no GPU, precision={cpu_precision()} (Unsloth's CPU backend decides)"


def cpu_precision() -> str:
    """What Unsloth's CPU backend computes in: bf16 on a CPU with bf16 hardware, else fp32."""
    from common.unsloth_internals import cpu_backend_uses_bf16
    return "bf16" if cpu_backend_uses_bf16() else "fp32"


def precision_for(capability: str | None) -> str:
    """bf16 from compute capability 8.0 (A100, L4, H100); fp16 below (T4, V100); fp32 with no GPU."""
    if capability is None:
        return "fp32"
    major, minor = (int(part) for part in capability.split("."))
    return "bf16" if (major, minor) >= (8, 0) else "fp16"


def detect(requested: str = "auto") -> Hardware:
    """The machine's GPU and the precision to train in; a forced bf16 without hardware support is refused."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu_name, capability = torch.cuda.get_device_name(0), f"{major}.{minor}"
    else:
        gpu_name = capability = None
    detected = precision_for(capability)
    if requested in ("auto", "", None):
        return Hardware(gpu_name, capability, detected)
    if gpu_name is None and requested == cpu_precision():
        return Hardware(gpu_name, capability, detected)  # what the CPU backend computes in anyway
    if requested == "bf16" and detected != "bf16":
        raise UserError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer; "
                        f"{gpu_name or 'this machine (no GPU)'} has {capability or 'none'}: use --precision {detected}")
    if requested == "fp16" and gpu_name is None:
        raise UserError("--precision fp16 needs a GPU; on CPU use --precision fp32")
    return Hardware(gpu_name, capability, requested)


def torch_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def precision_of(model) -> str:
    """The precision a loaded model computes in: Unsloth's CPU backend picks bf16 on a CPU with bf16 hardware whatever
    was asked, and a 4-bit model reports its compute dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(model.dtype, str(model.dtype))


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated by torch since the last reset; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def vram_gib() -> tuple[float, float] | None:
    """(free, total) GPU memory in GiB; None on CPU."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return free / 2**30, total / 2**30


def training_precision_flags(precision: str) -> dict:
    """SFTConfig's bf16/fp16 switches for a precision; fp32 sets neither."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}



if __name__ == "__main__":
    found = detect()
    print(f"gpu={(found.gpu_name or 'none').replace(' ', '-')} capability={found.capability or '-'} "
          f"precision={found.precision if found.gpu_name else cpu_precision()}")
