"""The TrainingArguments that depend on the machine, shared by masked-LM
adaptation and fine-tuning."""

from __future__ import annotations

import logging

import torch

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)


def training_device_args(cfg: TrainConfig) -> dict:
    """TrainingArguments for the machine: the GPU switches are on only with CUDA."""
    cuda = torch.cuda.is_available()
    if cuda:
        bf16 = (cfg.bf16 is None or cfg.bf16) and torch.cuda.is_bf16_supported()
        if cfg.bf16 and not bf16:
            log.info("bf16 asked for but this CUDA device has no bf16: training in fp32")
    else:
        # On a CPU only when asked for: bf16 autocast about halves a step's time on CPUs with
        # native bf16 (AVX512-BF16, AMX) and is slow emulation on the others.
        bf16 = bool(cfg.bf16)
    if cfg.torch_compile and not cuda:
        log.info("torch_compile is a GPU switch: off on CPU")
    args = {
        "bf16": bf16, "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "torch_compile": cfg.torch_compile and cuda, "dataloader_pin_memory": cuda,
        # Without it, torchrun on a CPU-only node runs N unsynchronised copies instead of DDP over gloo.
        "use_cpu": not cuda,
    }
    if cuda:
        # A blocking copy of each batch to the device waits for the device to finish the
        # previous step: a host sync per step. From pinned memory the copy can be queued.
        args["accelerator_config"] = {"non_blocking": True}
    return args
