"""Which number format a model computes in, chosen in one place for training and inference.

`auto`: bf16 autocast on a GPU with native bf16 (compute capability 8.0 or more: A100, L4, H100,
RTX 30xx on); fp16 autocast on older GPUs (T4, V100: bf16 there is emulated or slow), with a
gradient scaler in training, since fp16's narrow range lets small gradients underflow to zero;
fp32 on a CPU (no autocast: the demo's figures are fp32 ones). `fp32`, `fp16` or `bf16` is taken
as asked on any device (CPU autocast does both half formats, slowly).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from data_tools.errors import ConfigError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NATIVE_BF16 = (8, 0)  # the first CUDA compute capability with bf16 tensor cores (Ampere)


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | fp16 | bf16
    device_type: str  # cuda | cpu | ...

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's context: autocast to the half format, or nothing for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def scaled(self) -> bool:
        """Whether training scales the loss: fp16 only (bf16 has fp32's range)."""
        return self.name == "fp16"

    def scaler(self) -> torch.amp.GradScaler:
        """fp16's loss scaling; for fp32 and bf16 a disabled scaler, which passes through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def backward_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """zero_grad, backward and step through `scaler`: with fp16 the loss is scaled up before the
    backward pass and the gradients down before the step, which is skipped (and the scale halved)
    where they overflowed; a disabled scaler is a plain backward and step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def choose_precision(requested: str, device: str | torch.device,
                     capability: tuple[int, int] | None = None) -> Precision:
    """`requested` (auto | fp32 | fp16 | bf16) on `device`; `capability`: the GPU's (major, minor)
    compute capability, read from the device when not given."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    device = torch.device(device)
    if requested != "auto":
        return Precision(requested, device.type)
    if device.type != "cuda":
        return Precision("fp32", device.type)
    if capability is None:
        if torch.version.hip:  # ROCm GPUs compute bf16 natively
            return Precision("bf16", "cuda")
        capability = torch.cuda.get_device_capability(device)
    return Precision("bf16" if tuple(capability) >= NATIVE_BF16 else "fp16", "cuda")
