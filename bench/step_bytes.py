"""Bytes the compiled masked-LM step's own kernels read and write, as the compiler counts them.

On an H100 the memory-bound kernels of the trainer's step (dropout, residual adds, layer norms,
GELU and their backward) took about half its GPU time (bench/RESULTS.md), and a memory-bound
kernel's time follows its bytes. This script compiles the trainer's forward and backward
(``PackedBertForMaskedLM`` under bf16 autocast, set up as the trainer sets it up on a GPU:
replayed attention; the levers of ``bench/mlm_levers.py`` where a spec names them) for each
``--options`` spec and reports
the bytes of the kernels the compiler generates, apart from those of the library kernels it
calls (matrix products, attention). The count is torch._inductor's own: for each scheduled
kernel, the sizes of the buffers it reads and writes (``GraphLowering.count_bytes``).

Each spec compiles at two batch sizes. At a fixed sequence length the count is linear in the
batch, so the two give bytes per token and the bytes a step moves at ``--report-batch``.

On a CPU the compiler writes C++ instead of Triton kernels and may fuse differently, so the
counts there estimate the GPU's; on a GPU they are its own graph's. Nothing is timed, and the
count does not depend on the machine's load. The optimizer step (fused AdamW, outside the
compiled graph) is not counted.

    python bench/step_bytes.py --device cpu --size base --options default,bf16res,sparselast

Specs take the suffixes of ``bench/train_throughput.py`` (``bf16res``, ``sparselast``,
``padvocab``, ``fusedqkv``, ``nodrop``, ``gemmtune``, an attention name); ``default`` is the
trainer's step. ``padvocab`` pads the vocabulary projection as on a GPU wherever this runs. With
``gemmtune`` on a GPU, a product the compiler's own template wins counts among the generated
kernels, with whatever pointwise work it fused; on a CPU it changes nothing (the C++ product
templates take frozen weights only).
The last line printed is one JSON object; it is also appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
from torch._inductor import compile_fx, metrics
from torch._inductor.scheduler import ExternKernelSchedulerNode
from transformers import BertConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import train_throughput as tt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(tt.SIZES), default="base")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", default="8,16", help="the two batch sizes compiled for each spec")
    parser.add_argument("--report-batch", type=int, default=256, help="the batch the per-step figures are for")
    parser.add_argument("--options", default="default,bf16res",
                        help="comma-separated specs: 'default' or ':'-joined suffixes of bench/train_throughput.py")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also print, for each spec at the larger batch, the N groups of generated kernels "
                             "(kernels made of the same operations) that move the most bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "step_bytes.jsonl")
    return parser.parse_args(argv)


def count_kernel_bytes() -> None:
    """Makes the compiler count each kernel's bytes (it does so only when its metrics log is on)
    without printing that log (the graph's kernel list is long), and compile afresh each time: a
    graph loaded from the compiler's caches is not counted."""
    torch._logging.set_logs(inductor_metrics=True)
    compile_fx.inductor_metrics_log.propagate = False
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def operations(node) -> str:
    """The aten operations a scheduled kernel was made from, e.g. ``add,native_layer_norm``."""
    names = {str(origin.target).removeprefix("aten.").removesuffix(".default")
             for part in node.get_nodes() for origin in (getattr(part.node, "origins", None) or ())}
    return ",".join(sorted(names))


def top_groups(kernels: list[tuple[str, int]], count: int) -> list[tuple[str, int, int]]:
    """(operations, kernels, bytes) of the ``count`` groups of kernels with the most bytes."""
    groups: dict[str, list[int]] = {}
    for name, size in kernels:
        groups.setdefault(name, []).append(size)
    ranked = sorted(groups.items(), key=lambda item: -sum(item[1]))[:count]
    return [(name, len(sizes), sum(sizes)) for name, sizes in ranked]


def compiled_step_bytes(config: BertConfig, spec: str, batch: int, args: argparse.Namespace) -> dict:
    """Compiles one forward and backward of the trainer's model for ``spec`` at ``batch`` rows and
    returns the bytes of the generated kernels and of the library kernels, their numbers, and the
    generated kernels' groups with the most bytes."""
    options = [] if spec == "default" else spec.split(":")
    attention, switches = tt.spec_options(f"--options {spec}", options, "replayed")
    model, _ = tt.trainer_model(config, args.seed, args.device, attention_dropout=True,
                                attention=attention, compiled=True, switches=switches)
    model.pad_vocab_on = ("cpu", "cuda")  # with padvocab, as on a GPU wherever this runs
    generator = torch.Generator().manual_seed(args.seed)
    blocks = tt.synthetic_blocks(batch, args.seq, config.vocab_size, generator)
    masked = tt.mask_collator(config.vocab_size, generator)(blocks)
    inputs = {key: tensor.to(args.device) for key, tensor in masked.items()}
    torch._dynamo.reset()
    metrics.reset()
    with torch._inductor.config.patch(tt.inductor_options(switches)):
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = torch.compile(model)(**inputs).loss
        loss.backward()
    # nodes_num_elem holds each kernel's bytes // 4
    library = [4 * elements for node, elements in metrics.nodes_num_elem if isinstance(node, ExternKernelSchedulerNode)]
    generated = [(operations(node), 4 * elements) for node, elements in metrics.nodes_num_elem
                 if not isinstance(node, ExternKernelSchedulerNode)]
    return {"generated_bytes": sum(size for _, size in generated), "generated_kernels": len(generated),
            "library_bytes": sum(library), "library_kernels": len(library), "top": top_groups(generated, args.top)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if len(batches) != 2 or batches[0] >= batches[1]:
        raise SystemExit("--batches takes two increasing batch sizes")
    config = BertConfig(**tt.SIZES[args.size], max_position_embeddings=max(512, args.seq))
    count_kernel_bytes()
    specs = {}
    for spec in (s.strip() for s in args.options.split(",") if s.strip()):
        started = time.perf_counter()
        small, large = (compiled_step_bytes(config, spec, batch, args) for batch in batches)
        tokens = (batches[1] - batches[0]) * args.seq
        figures = {}
        for kind in ("generated", "library"):
            per_token = (large[f"{kind}_bytes"] - small[f"{kind}_bytes"]) / tokens
            fixed = small[f"{kind}_bytes"] - per_token * batches[0] * args.seq
            figures[f"{kind}_bytes_per_token"] = round(per_token, 1)
            figures[f"{kind}_gb_per_step"] = round((fixed + per_token * args.report_batch * args.seq) / 1e9, 3)
            figures[f"{kind}_kernels"] = large[f"{kind}_kernels"]
        if args.top:
            figures["top_groups"] = [{"operations": name, "kernels": kernels, "bytes": size}
                                     for name, kernels, size in large["top"]]
        specs[spec] = figures
        print(f"{spec:>32}: generated kernels {figures['generated_bytes_per_token'] / 1e3:8.1f} kB/token, "
              f"{figures['generated_gb_per_step']:6.2f} GB a step at batch {args.report_batch} "
              f"({figures['generated_kernels']} kernels); library {figures['library_gb_per_step']:6.2f} GB "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        for name, kernels, size in large["top"]:
            print(f"{size / 1e6:12.1f} MB in {kernels:3d} kernels at batch {batches[1]}: {name}", flush=True)
    first = next(iter(specs.values()))
    if not first["generated_gb_per_step"]:
        raise SystemExit("the compiler counted no bytes: its metrics log did not run")
    for spec, figures in specs.items():
        figures["generated_vs_first"] = round(figures["generated_gb_per_step"] / first["generated_gb_per_step"], 4)
    report = {
        "bench": "step_bytes", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device, "device_name": tt.device_name(args.device), "torch": torch.__version__,
        "size": args.size, "seq": args.seq, "batches": batches, "report_batch": args.report_batch,
        "loadavg_1m": round(os.getloadavg()[0], 2), "specs": specs,
    }
    tt.write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
