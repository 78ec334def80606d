"""The matrix products of one masked-LM step, timed alone: how fast the step could be at best.

A bert-base training step is mostly matrix products, and no fusion of the rest makes those
faster. This script runs exactly the products one step performs, at the step's shapes, back to
back and nothing else (on CUDA captured in one CUDA graph, so no launch gaps):

* for every linear layer, the forward product and both backward ones (input and weight grads);
* attention's batched products: scores and weighted values, forward, and their four backward
  products (a fused attention kernel does the same arithmetic);
* the MLM head's two linear layers on ``B * S`` rows (``baseline``: Hugging Face's head over
  every position) or on ``B * k`` rows (``trainer``: the project's head on masked rows only);
  ``trainer_levers`` adds two levers of ``bench/mlm_levers.py`` not yet timed in a step: the
  last encoder layer on those rows only (keys and values from every position) and the
  vocabulary projection padded to a multiple of 64 outputs.

In the same run it times the eager baseline of ``bench/train_throughput.py`` on the same
model size and batch, and reports

    ceiling_ratio = baseline step time / trainer products time

the largest speed-up over that baseline that any trainer doing the same products in the same
precision could show, with everything besides the products taking no time at all
(``ceiling_ratio_levers``: the same for ``trainer_levers``). A goal above it needs fewer or
cheaper products (lower precision), not better fusion.

It also reports the TFLOP/s of each distinct linear-layer shape alone, of the query, key and
value projections fused into one product (hidden -> 3 x hidden), and of the vocabulary projection
unpadded: narrow products run further from the peak than wide ones, and misaligned ones further
still; this says by how much.

    python bench/gemm_floor.py --device cuda --size base --batch 256 --seq 128

The last line printed is one JSON object; it is also appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BertConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import train_throughput as tt  # noqa: E402
from bench.mlm_levers import VOCAB_MULTIPLE  # noqa: E402
from pipeline.train.fast_mlm import num_predictions  # noqa: E402


@dataclass(frozen=True)
class Linear:
    rows: int  # tokens through the layer
    inputs: int
    outputs: int


def padded_vocab(vocab_size: int) -> int:
    """The vocabulary projection's width with the padding lever (``:padvocab``) on a GPU."""
    return vocab_size + -vocab_size % VOCAB_MULTIPLE


def step_linears(config: BertConfig, tokens: int, head_rows: int, levers: bool) -> list[Linear]:
    """The linear layers one step runs through, in order: 6 per encoder layer, then the head.
    ``levers``: the last layer on the head's rows and the vocabulary padded (``bench/mlm_levers.py``)."""
    hidden, inner = config.hidden_size, config.intermediate_size

    def layer(rows: int) -> list[Linear]:  # query, key, value, attention output, feed-forward in and out
        return [Linear(rows, hidden, hidden), Linear(tokens, hidden, hidden), Linear(tokens, hidden, hidden),
                Linear(rows, hidden, hidden), Linear(rows, hidden, inner), Linear(rows, inner, hidden)]

    vocab = padded_vocab(config.vocab_size) if levers else config.vocab_size
    layers = [layer(tokens)] * (config.num_hidden_layers - 1) + [layer(head_rows if levers else tokens)]
    return [linear for one in layers for linear in one] + [Linear(head_rows, hidden, hidden), Linear(head_rows, hidden, vocab)]


def linear_products(linears: list[Linear], device: str, dtype: torch.dtype) -> tuple[list[Callable[[], None]], float]:
    """Forward, input-gradient and weight-gradient products of each linear layer, and their FLOPs."""
    flops, work = 0.0, []
    for linear in linears:
        x = torch.randn(linear.rows, linear.inputs, device=device, dtype=dtype)
        w = torch.randn(linear.outputs, linear.inputs, device=device, dtype=dtype)
        dy = torch.randn(linear.rows, linear.outputs, device=device, dtype=dtype)
        work += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x]
        flops += 3 * 2 * linear.rows * linear.inputs * linear.outputs
    return work, flops


def step_products(config: BertConfig, batch: int, seq: int, head_rows: int, levers: bool, device: str,
                  dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """A function running every matrix product of one training step, and their FLOPs."""
    work, flops = linear_products(step_linears(config, batch * seq, head_rows, levers), device, dtype)
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for index in range(config.num_hidden_layers):
        queries = head_rows // batch if levers and index == config.num_hidden_layers - 1 else seq
        k, v = (torch.randn(batch * heads, seq, head_dim, device=device, dtype=dtype) for _ in range(2))
        q, d_out = (torch.randn(batch * heads, queries, head_dim, device=device, dtype=dtype) for _ in range(2))
        p, d_scores = (torch.randn(batch * heads, queries, seq, device=device, dtype=dtype) for _ in range(2))
        work += [
            lambda q=q, k=k: q @ k.transpose(1, 2), lambda p=p, v=v: p @ v,  # forward
            lambda d=d_out, v=v: d @ v.transpose(1, 2), lambda p=p, d=d_out: p.transpose(1, 2) @ d,  # d probs, d values
            lambda s=d_scores, k=k: s @ k, lambda s=d_scores, q=q: s.transpose(1, 2) @ q,  # d queries, d keys
        ]
        flops += 6 * 2 * batch * heads * queries * seq * head_dim
    return run_all(work), flops


def run_all(work: list[Callable[[], None]]) -> Callable[[], None]:
    def run() -> None:
        for product in work:
            product()

    return run


def shape_rates(config: BertConfig, tokens: int, head_rows: int, device: str, dtype: torch.dtype,
                repeats: int) -> dict[str, float]:
    """TFLOP/s of each distinct linear layer's three products (rows x inputs -> outputs), of the
    query, key and value projections fused into one (hidden -> 3 x hidden), which would show
    whether fusing them pays, and of the vocabulary projection unpadded, which shows what the
    padding gains."""
    hidden = config.hidden_size
    shapes = dict.fromkeys(step_linears(config, tokens, head_rows, levers=True)
                           + [Linear(tokens, hidden, 3 * hidden), Linear(head_rows, hidden, config.vocab_size)])
    rates = {}
    for linear in shapes:
        work, flops = linear_products([linear], device, dtype)
        rates[f"{linear.rows}x{linear.inputs}->{linear.outputs}"] = round(flops / time_ms(run_all(work), device, repeats) / 1e9, 1)
    return rates


def time_ms(run: Callable[[], None], device: str, repeats: int, warmup: int = 2, graph: bool = True) -> float:
    """Milliseconds per call after ``warmup`` calls; on CUDA with ``graph`` the calls are captured
    once in a CUDA graph and replayed."""
    if device == "cuda" and graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        run = cuda_graph.replay
    for _ in range(warmup):
        run()
    tt.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    tt.synchronize(device)
    return 1000 * (time.perf_counter() - started) / repeats


def baseline_step_ms(config: BertConfig, args: argparse.Namespace) -> float:
    """The eager Hugging Face step of bench/train_throughput.py, on the same size and batch."""
    tp_args = tt.parse_args(["--device", args.device, "--size", args.size, "--batch", str(args.batch), "--seq",
                             str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", os.devnull])
    generator = torch.Generator().manual_seed(tp_args.seed)
    blocks = tt.synthetic_blocks((args.warmup + args.steps) * args.batch, args.seq, config.vocab_size, generator)
    batches, _ = tt.static_batches(blocks, args.batch, tt.mask_collator(config.vocab_size, generator))
    tokens = [args.batch * args.seq] * len(batches)
    result = tt.time_run("baseline", tt.baseline_maker(config, tp_args), tt.baseline_batches(batches, args.device), tokens,
                         tp_args, 1.0)
    return result["step_ms"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(tt.SIZES), help="default: base on cuda, tiny on cpu")
    parser.add_argument("--batch", type=int, help="rows per step; default: 256 on cuda, 8 on cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions of the products")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the eager baseline")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense FLOPs (H100 bf16: 989)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gemm_floor.jsonl")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    args.size = args.size or ("base" if cuda else "tiny")
    args.batch = args.batch or (256 if cuda else 8)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = BertConfig(**tt.SIZES[args.size], max_position_embeddings=max(512, args.seq))
    k = num_predictions(args.seq)
    print(f"size {args.size}, batch {args.batch}, seq {args.seq}, k {k}, {dtype}, {tt.device_name(args.device)}",
          flush=True)

    products = {}
    for name, head_rows, levers in (("trainer", args.batch * k, False), ("trainer_levers", args.batch * k, True),
                                    ("baseline", args.batch * args.seq, False)):
        run, flops = step_products(config, args.batch, args.seq, head_rows, levers, args.device, dtype)
        ms = time_ms(run, args.device, args.repeats)
        products[name] = {"ms": round(ms, 3), "tflop": round(flops / 1e12, 3),
                          "tflops_per_s": round(flops / ms / 1e9, 1), "of_peak": round(flops / ms / 1e9 / args.peak_tflops, 3)}
        print(f"{name} products: {ms:.2f} ms per step, {flops / 1e12:.2f} TFLOP, {flops / ms / 1e9:,.0f} TFLOP/s", flush=True)
        del run
    products["trainer_levers"]["shapes_tflops_per_s"] = rates = shape_rates(
        config, args.batch * args.seq, args.batch * k, args.device, dtype, args.repeats)
    print("TFLOP/s by linear layer shape (its three products): "
          + ", ".join(f"{shape} {rate:,.1f}" for shape, rate in rates.items()), flush=True)
    baseline_ms = baseline_step_ms(config, args)
    ceiling = baseline_ms / products["trainer"]["ms"]
    ceiling_levers = baseline_ms / products["trainer_levers"]["ms"]
    print(f"eager baseline step {baseline_ms:.2f} ms; ceiling for a trainer with these products: {ceiling:.2f}x "
          f"(with the sparse last layer and padded vocabulary: {ceiling_levers:.2f}x)", flush=True)
    report = {
        "bench": "gemm_floor", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": args.device,
        "device_name": tt.device_name(args.device), "torch": torch.__version__, "size": args.size, "batch": args.batch,
        "seq": args.seq, "k": k, "dtype": str(dtype).removeprefix("torch."), "products": products,
        "baseline_step_ms": baseline_ms, "ceiling_ratio": round(ceiling, 3),
        "ceiling_ratio_levers": round(ceiling_levers, 3),
    }
    tt.write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
