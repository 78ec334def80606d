"""Masked-LM training throughput: the project's trainer against a plain Hugging Face loop.

In one process and on the same batches it times

* ``baseline``: what a user would write: ``BertForMaskedLM(input_ids, attention_mask,
  labels=labels).loss.backward()`` then ``torch.optim.AdamW.step()``, under autocast, in eager
  mode (Hugging Face's default SDPA attention, vocabulary head over every position);
* ``fast``: the project's masked-LM trainer, as ``pipeline.train.mlm.adapt_mlm`` runs it: a
  Hugging Face ``Trainer`` with ``mlm_training_arguments`` (bf16, fused AdamW, torch.compile of
  the model, gradient clipping, learning-rate schedule, no per-step host sync) training
  ``PackedBertForMaskedLM`` (``pipeline.train.fast_mlm``): packed full blocks with no attention
  mask, exactly ``k = round(0.15 * seq)`` predictions per row with the MLM head on those rows
  only, attention as the trainer picks it (``replays_attention``: replayed where compiled on a
  GPU). The ``--compile-mode`` suffixes add the levers of ``bench/mlm_levers.py``, not yet
  timed on a GPU (the model is ``LeverBertForMaskedLM``, the same step with all levers off).
  Its batches come from the Trainer's own data loader (on the host, pinned, copied to the
  device each step); the baseline's are staged on the device first, which favours the baseline.
  The collator's host time per batch is reported as ``collate_ms`` (the Trainer's collator runs
  while the device works on the previous step).

Both start from the same initial weights and see the same masked positions (the baseline gets
them as ``labels`` = -100 everywhere else). With ``--real`` the blocks are Reuters-21578 bodies
and Financial PhraseBank sentences tokenised by a WordPiece vocabulary trained on the fly, and
a third run, ``baseline_padded``, is the naive user: one text per row padded to ``--seq``, Hugging
Face's ``DataCollatorForLanguageModeling``. Throughput there counts useful (non-pad) tokens.

Figures
-------
tokens/s        input tokens of the timed steps (non-pad tokens for padded rows) over wall time,
                device synchronised before and after (for the Trainer, at the end of the last
                warm-up step and of the last timed step); the loops never read the loss back.
ratio           fast tokens/s over baseline tokens/s (same batches); with --real also
                ``ratio_vs_padded``: fast on packed blocks over the naive padded loop.
graphs          Trainer runs: ``graphs`` compiled and ``graph_breaks`` (torch._dynamo's counters).
host syncs      CUDA, Trainer runs: ``host_syncs_timed`` counts the host-device synchronisations in the
                timed steps (``torch.cuda.set_sync_debug_mode("warn")`` during them); 0 means the host
                queues work ahead of the device throughout.
peak memory     CUDA: ``torch.cuda.max_memory_allocated`` over the run (model, optimizer state,
                activations). CPU: the highest resident set size of the process sampled every
                5 ms during the run (so it includes the Python process itself).
MFU             model FLOPs per token  F = 6 * N + 12 * L * H * S, where N counts every
                parameter once (the tied decoder/embedding matrix included), L layers, H hidden
                size, S the sequence length: 6N for forward + backward through the weights, 12LHS
                for the attention score and value matmuls. MFU = F * tokens/s / (peak_tflops * 1e12).
                The same nominal F is used for every run, so the head rows the fast step skips
                are not credited to it; MFU ratios equal throughput ratios. ``--peak-tflops``
                defaults to 989 (H100 SXM bf16 dense); on a CPU the figure is only a placeholder.

GPU figures come from running this script on a GPU node, e.g.
``python bench/train_throughput.py --device cuda --size base --batch 256 --seq 128``.
The last line printed is one JSON object with all figures; it is also appended to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import html
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from transformers import BertConfig, BertForMaskedLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.mlm_levers import ATTENTION, VOCAB_MULTIPLE, LeverBertForMaskedLM, apply_recipe_levers  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train.fast_mlm import StaticMaskCollator, replays_attention  # noqa: E402
from pipeline.train.mlm import mlm_training_arguments  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SIZES = {
    "base": {},  # BertConfig defaults: 12 layers, hidden 768, 12 heads, vocab 30522
    "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
}
Batch = tuple[torch.Tensor, ...]
# --compile-mode suffix -> the attention a fast run uses instead of the trainer's own choice
ATTENTION_OPTIONS = {"sdpaattn": "sdpa", "eagerattn": "eager", "replayattn": "replayed", "cudnnattn": "cudnn"}
# --compile-mode suffix -> (the switch it sets, recorded under that name in the JSON;
#                          True where the suffix turns the switch off). The switches that are not
# Inductor options are levers of bench/mlm_levers.py, off in the trainer's step.
STEP_OPTIONS = {
    "sparselast": ("sparse_last_layer", False), "padvocab": ("padded_vocab", False), "fusedqkv": ("fused_qkv", False),
    "bf16res": ("bf16_residual", False), "cdtune": ("coordinate_descent_tuning", False), "nodrop": ("dropout", True),
    "gemmtune": ("max_autotune_gemm", False),
}
# Suffixes that name the trainer's own step (they were levers' off switches when those were its
# default), so that older commands parse -> the lever suffix they contradict.
TRAINER_STEP_OPTIONS = {"denselast": "sparselast", "nopadvocab": "padvocab"}
# The switches that are torch._inductor.config options of the same name, patched around a run.
INDUCTOR_SWITCHES = ("coordinate_descent_tuning", "max_autotune_gemm")


def inductor_options(switches: dict[str, bool]) -> dict[str, bool]:
    return {name: switches[name] for name in INDUCTOR_SWITCHES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=list(SIZES), help="default: base on cuda, tiny on cpu")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype; default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, help="rows per step; default: 256 on cuda, 8 on cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--real", action="store_true", help="Reuters + PhraseBank texts, packed vs padded")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the fast run (the Trainer's torch_compile_mode), or 'none'; "
                             "'default' is what the project's trainer uses; 'reduce-overhead' / 'max-autotune' add "
                             "CUDA graphs. "
                             "Several, comma-separated, time one fast run each (the first is 'fast', the others "
                             "'fast_<mode>'); suffixes: "
                             "':noattndrop' sets attention dropout to 0 (a different recipe: the compiler can then "
                             "keep SDPA's fused kernel); attention is the trainer's own choice (replayed where "
                             "compiled on a GPU) unless ':sdpaattn' (transformers' SDPA, traced by the "
                             "compiler), ':eagerattn' (outside the compiled graph), ':replayattn' (one op the "
                             "compiler keeps whole, its backward replaying it) or ':cudnnattn' (cuDNN's op with its "
                             "own backward) names it; the levers of bench/mlm_levers.py, not yet timed on a GPU: "
                             "':sparselast' runs the last encoder layer on the masked rows only (':denselast', over "
                             "every row, is the trainer's); ':padvocab' pads the vocabulary projection to a multiple "
                             "of 64 outputs on a GPU (':nopadvocab' is the trainer's); "
                             "':fusedqkv' computes query, key and value as one product; ':bf16res' keeps the "
                             "residual stream between layers in bf16; ':nodrop' trains without dropout anywhere "
                             "(a different recipe; the baseline keeps BERT's); ':cdtune' lets "
                             "the compiler tune its generated kernels' block sizes "
                             "(torch._inductor.config.coordinate_descent_tuning); ':gemmtune' lets it pick each "
                             "matrix product among cuBLAS and its own Triton templates, into which it can fuse the "
                             "pointwise work after the product (GELU, bias, dropout + residual), keeping a fusion "
                             "only where it times faster (torch._inductor.config.max_autotune_gemm: max-autotune's "
                             "product search without its pointwise search or CUDA graphs; minutes of compiling)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after each timed run, profile this many more steps and print the costliest kernels")
    parser.add_argument("--inputs", type=Path,
                        help="with --real: a folder written by bench/accuracy.py --export-inputs instead of ../shared/data")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense FLOPs for MFU (H100 bf16: 989)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_throughput.jsonl")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or ("base" if cuda else "tiny")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (256 if cuda else 8)
    return args


# ---------------------------------------------------------------- data


def load_texts(inputs: Path | None = None) -> list[str]:
    """Reuters-21578 <BODY> texts and Financial PhraseBank (50Agree) sentences."""
    if inputs is not None:
        import gzip

        import pandas as pd

        with gzip.open(inputs / "reuters_texts.json.gz", "rt", encoding="utf-8") as handle:
            texts = json.load(handle)
        return texts + [t for name in ("train", "validation", "test") for t in pd.read_parquet(inputs / f"{name}.parquet")["text"]]
    texts = []
    for path in sorted((DATA / "reuters21578").glob("reut2-*.sgm")):
        sgml = path.read_bytes().decode("latin-1")
        for body in re.findall(r"<BODY>(.*?)</BODY>", sgml, re.S):
            text = " ".join(html.unescape(body).replace("\x03", " ").split())
            if text:
                texts.append(text)
    lines = (DATA / "financial_phrasebank" / "Sentences_50Agree.txt").read_bytes().decode("latin-1").splitlines()
    texts += [line.rsplit("@", 1)[0].strip() for line in lines if "@" in line]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing

    tokenizer = BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    # Built before training, the wrapper has no [CLS] ... [SEP] post-processor yet.
    tokenizer.post_processor = BertProcessing(("[SEP]", SPECIAL_TOKENS.index("[SEP]")), ("[CLS]", SPECIAL_TOKENS.index("[CLS]")))
    return tokenizer


def synthetic_blocks(rows: int, seq: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    blocks = torch.randint(len(SPECIAL_TOKENS), vocab_size, (rows, seq), generator=generator)
    blocks[:, 0] = SPECIAL_TOKENS.index("[CLS]")
    return blocks


def packed_blocks(token_lists: list[list[int]], rows: int, seq: int) -> torch.Tensor:
    """Concatenated texts cut into full blocks (as pipeline.train.mlm.group_texts); wraps around if short."""
    flat = torch.tensor([token for tokens in token_lists for token in tokens], dtype=torch.long)
    blocks = flat[: len(flat) // seq * seq].view(-1, seq)
    return blocks[torch.arange(rows) % len(blocks)]


def static_batches(blocks: torch.Tensor, batch: int, collator: StaticMaskCollator) -> tuple[list[dict], float]:
    """The masked batches on the host, and the collator's mean time per batch in ms."""
    out, started = [], time.perf_counter()
    for start in range(0, len(blocks), batch):
        out.append(collator(blocks[start : start + batch]))
    return out, 1000 * (time.perf_counter() - started) / max(len(out), 1)


def baseline_batches(fast: list[dict], device: str) -> list[Batch]:
    """The same masked blocks in Hugging Face form, staged on the device: all-ones attention
    mask, labels -100 off the masked positions."""
    out = []
    for b in fast:
        labels = torch.full_like(b["input_ids"], -100).scatter_(1, b["masked_positions"], b["masked_labels"])
        out.append((b["input_ids"].to(device), torch.ones_like(b["input_ids"]).to(device), labels.to(device)))
    return out


def padded_batches(texts: list[str], tokenizer, batch: int, seq: int, seed: int, device: str) -> list[Batch]:
    """A naive user's batches: one text per row, truncated and padded to ``seq``, HF's MLM collator."""
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    collator = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=0.15, seed=seed)
    out = []
    for start in range(0, len(texts), batch):
        encoded = hf_tokenizer(texts[start : start + batch], padding="max_length", truncation=True, max_length=seq)
        features = [{"input_ids": ids, "attention_mask": mask} for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        masked = collator(features)
        out.append((masked["input_ids"].to(device), masked["attention_mask"].to(device), masked["labels"].to(device)))
    return out


# ---------------------------------------------------------------- measurement


class PeakMemory:
    """CUDA: max_memory_allocated. CPU: the process RSS high-water mark, sampled in a thread."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)
            time.sleep(0.005)

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(config: BertConfig, seed: int, device: str, cls: type = BertForMaskedLM) -> BertForMaskedLM:
    """A fresh model; the same seed gives every run the same initial weights."""
    torch.manual_seed(seed)
    return cls(config).to(device).train()


def mask_collator(vocab_size: int, generator: torch.Generator) -> StaticMaskCollator:
    return StaticMaskCollator(SPECIAL_TOKENS.index("[MASK]"), vocab_size, range(len(SPECIAL_TOKENS)), generator=generator)


def baseline_maker(config: BertConfig, args: argparse.Namespace) -> Callable[[], Callable]:
    """Builds the eager Hugging Face step a user would write, with a fresh model."""
    autocast = torch.bfloat16 if args.dtype == "bf16" else None

    def make() -> Callable:
        model = build_model(config, args.seed, args.device)
        return eager_step(model, torch.optim.AdamW(model.parameters(), lr=args.lr), autocast)

    return make


def eager_step(model: BertForMaskedLM, optimizer: torch.optim.Optimizer, autocast: torch.dtype | None) -> Callable:
    device_type = next(model.parameters()).device.type

    def step(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def print_profile(name: str, step: Callable, batches: list[Batch], device: str) -> None:
    """The kernels (or CPU ops) that took the most time over ``batches``, per step."""
    profiler = new_profiler(device)
    with profiler:
        for batch in batches:
            step(*batch)
        synchronize(device)
    print_profile_table(name, profiler, len(batches), device)


def new_profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


def print_profile_table(name: str, profiler, steps: int, device: str, rows: int = 40) -> None:
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of {name}, {steps} steps, sorted by {sort_by}:")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70), flush=True)


def time_run(name: str, make_step: Callable[[], Callable], batches: list[Batch], useful_tokens: list[int],
             args: argparse.Namespace, flops_per_token: float) -> dict:
    """Warm-up steps, then ``args.steps`` timed steps; the loss is read once, after the clock stops."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(args.device) as memory:
        step = make_step()
        started = time.perf_counter()
        total = 0.0
        for batch in batches[: args.warmup]:
            total = total + step(*batch)
        synchronize(args.device)
        warmup_s = time.perf_counter() - started
        timed = batches[args.warmup : args.warmup + args.steps]
        started = time.perf_counter()
        for batch in timed:
            loss = step(*batch)
            total = total + loss
        synchronize(args.device)
        elapsed = time.perf_counter() - started
        if args.profile:
            print_profile(name, step, batches[: args.profile], args.device)
    return report_run(name, sum(useful_tokens[args.warmup : args.warmup + args.steps]), elapsed, len(timed),
                      memory.peak, warmup_s, float(total) / (args.warmup + len(timed)), args, flops_per_token)


def report_run(name: str, tokens: int, elapsed: float, steps: int, peak: int, warmup_s: float, mean_loss: float,
               args: argparse.Namespace, flops_per_token: float) -> dict:
    tokens_per_s = tokens / elapsed
    result = {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(1000 * elapsed / steps, 2),
        "peak_mem_mib": round(peak / 2**20, 1),
        "mfu": round(flops_per_token * tokens_per_s / (args.peak_tflops * 1e12), 6),
        "warmup_s": round(warmup_s, 1),
        "mean_loss": round(mean_loss, 4),
    }
    print(f"{name:16s} {result['tokens_per_s']:>12,.0f} tok/s  {result['step_ms']:>9.1f} ms/step  "
          f"peak {result['peak_mem_mib']:>9,.0f} MiB  MFU {100 * result['mfu']:.3f}%  "
          f"(warm-up {warmup_s:.1f} s, mean loss {result['mean_loss']})", flush=True)
    return result


class ReplayCollator:
    """Hands the Trainer the prepared batches in order, whatever rows its sampler drew, so the
    Trainer and the baseline train on the same batches."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches, self.served = batches, 0

    def __call__(self, rows: list) -> dict:
        batch = self.batches[self.served % len(self.batches)]
        self.served += 1
        return dict(batch)


def trainer_model(config: BertConfig, seed: int, device: str, attention_dropout: bool, attention: str,
                  compiled: bool, switches: dict[str, bool]) -> tuple[LeverBertForMaskedLM, str]:
    """The trainer's model, set up as ``adapt_mlm`` sets it up, with the baseline's initial
    weights and the levers ``switches`` name; returns it and the attention it trains with."""
    model_config = copy.deepcopy(config)
    if not attention_dropout:
        model_config.attention_probs_dropout_prob = 0.0
    model = build_model(model_config, seed, device, LeverBertForMaskedLM)
    model.last_layer_on_masked_rows = switches["sparse_last_layer"]
    model.fused_qkv = switches["fused_qkv"]
    model.vocab_multiple = VOCAB_MULTIPLE if switches["padded_vocab"] else 1
    model.bf16_residual = switches["bf16_residual"]
    model.dropout = None if switches["dropout"] else 0.0
    apply_recipe_levers(model)
    if attention == "auto":
        attention = "replayed" if replays_attention(model, compiled_on_gpu=compiled and device == "cuda") else "sdpa"
    if ATTENTION[attention] is not None:
        ATTENTION[attention](model)
    return model, attention


def spec_options(spec: str, options: list[str], default_attention: str,
                 others: tuple[str, ...] = ()) -> tuple[str, dict[str, bool]]:
    """The attention and the step's switches a spec's suffixes name (the defaults where none is
    named); exits on a suffix that is neither one of those nor in ``others``."""
    if unknown := set(options) - {*others, *STEP_OPTIONS, *ATTENTION_OPTIONS, *TRAINER_STEP_OPTIONS}:
        raise SystemExit(f"{spec}: unknown option(s) {', '.join(sorted(unknown))}")
    if clashes := [f"{own}/{lever}" for own, lever in TRAINER_STEP_OPTIONS.items() if {own, lever} <= set(options)]:
        raise SystemExit(f"{spec}: contradictory options {', '.join(clashes)}")
    named = [choice for option, choice in ATTENTION_OPTIONS.items() if option in options]
    switches = {switch: (option in options) != off_by_option for option, (switch, off_by_option) in STEP_OPTIONS.items()}
    return (named[0] if named else default_attention), switches


def trainer_run(name: str, model: LeverBertForMaskedLM, batches: list[dict], mode: str, args: argparse.Namespace,
                flops_per_token: float) -> dict:
    """The project's masked-LM Trainer for warm-up + timed (+ profiled) steps; the clock reads at
    the end of the last warm-up step and of the last timed step, the device synchronised there."""
    from transformers import Trainer, TrainerCallback

    warmup, last = args.warmup, args.warmup + args.steps
    total_steps = last + args.profile
    marks: dict[str, float] = {}
    profiler = new_profiler(args.device) if args.profile else None

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks["begin"] = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__):
            cuda = args.device == "cuda"
            if state.global_step == last and cuda:
                torch.cuda.set_sync_debug_mode(0)
            if state.global_step in (warmup, last):
                synchronize(args.device)
                marks[state.global_step] = time.perf_counter()
            if state.global_step == warmup and cuda:
                # Every host sync in the timed steps raises a warning, counted below.
                torch.cuda.set_sync_debug_mode("warn")
            if profiler is not None and state.global_step == last:
                profiler.start()

    cfg = TrainConfig(
        mlm_steps=total_steps, mlm_batch_size=args.batch, mlm_learning_rate=args.lr, checkpoint_steps=0,
        bf16=args.dtype == "bf16", torch_compile=mode != "none", seed=args.seed,
    )
    compile_mode = {"torch_compile_mode": None if mode in ("none", "default") else mode}
    # On a CPU the project's trainer does not compile; here the mode asked for decides.
    if args.device != "cuda":
        compile_mode["torch_compile"] = mode != "none"
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    counters.clear()
    with tempfile.TemporaryDirectory() as output_dir, PeakMemory(args.device) as memory:
        training_args = mlm_training_arguments(
            cfg, Path(output_dir), logging_steps=total_steps, disable_tqdm=True, **compile_mode,
        )
        rows = [{"input_ids": [0]}] * (total_steps * args.batch)
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=ReplayCollator(batches),
                          callbacks=[Clock()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = trainer.train()
        syncs = [str(w.message) for w in caught if "synchronizing CUDA operation" in str(w.message)]
        if profiler is not None:
            synchronize(args.device)
            profiler.stop()
    if profiler is not None:
        print_profile_table(name, profiler, args.profile, args.device)
    tokens = args.steps * args.batch * args.seq
    result = report_run(name, tokens, marks[last] - marks[warmup], args.steps, memory.peak,
                        marks[warmup] - marks["begin"], output.training_loss, args, flops_per_token)
    result["graphs"] = counters["stats"]["unique_graphs"]
    result["graph_breaks"] = sum(counters["graph_break"].values())
    if args.device == "cuda":
        result["host_syncs_timed"] = len(syncs)
        print(f"{name}: {len(syncs)} host syncs in the timed steps" + (f", first: {syncs[0][:200]}" if syncs else ""))
    return result


def write_report(report: dict, out: Path) -> None:
    """Prints the report as one JSON line (the script's last) and appends it to ``out``."""
    line = json.dumps(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as file:
        file.write(line + "\n")
    print(line)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU")
    config = BertConfig(**SIZES[args.size], max_position_embeddings=max(512, args.seq))
    compile_modes = [mode.strip() for mode in args.compile_mode.split(",") if mode.strip()]
    rows = (args.warmup + args.steps) * args.batch
    generator = torch.Generator().manual_seed(args.seed)
    collator = mask_collator(config.vocab_size, generator)

    texts = []
    if args.real:
        texts = load_texts(args.inputs)
        random.Random(args.seed).shuffle(texts)
        started = time.perf_counter()
        tokenizer = train_tokenizer(texts, config.vocab_size)
        token_lists = [encoding.ids for encoding in tokenizer.encode_batch(texts)]
        print(f"{len(texts):,} texts, {sum(map(len, token_lists)):,} tokens, WordPiece vocabulary "
              f"{tokenizer.get_vocab_size():,} trained in {time.perf_counter() - started:.1f} s", flush=True)
        blocks = packed_blocks(token_lists, rows, args.seq)
    else:
        blocks = synthetic_blocks(rows, args.seq, config.vocab_size, generator)
    fast_data, collate_ms = static_batches(blocks, args.batch, collator)
    block_tokens = [args.batch * args.seq] * len(fast_data)

    params = sum(p.numel() for p in BertForMaskedLM(config).parameters())
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    print(f"size {args.size} ({params / 1e6:.1f} M parameters), seq {args.seq}, batch {args.batch}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.dtype}, device {device_name(args.device)}, "
          f"fast step compile mode {args.compile_mode}", flush=True)

    baseline = baseline_maker(config, args)

    runs = {}
    if args.real:
        padded = padded_batches(texts[:rows], tokenizer, args.batch, args.seq, args.seed, args.device)
        padded_tokens = [int(mask.sum()) for _, mask, _ in padded]
        runs["baseline_padded"] = time_run("baseline_padded", baseline, padded, padded_tokens, args, flops_per_token)
        runs["baseline_padded"]["useful_fraction"] = round(sum(padded_tokens) / (len(padded) * args.batch * args.seq), 4)
    runs["baseline"] = time_run("baseline", baseline, baseline_batches(fast_data, args.device), block_tokens, args,
                                flops_per_token)
    for index, spec in enumerate(compile_modes):
        mode, *options = spec.split(":")
        attention, switches = spec_options(f"--compile-mode {spec}", options, "auto", others=("noattndrop",))
        attention_dropout = "noattndrop" not in options and switches["dropout"]
        name = "fast" if index == 0 else f"fast_{spec.replace(':', '_')}"
        try:
            model, attention = trainer_model(config, args.seed, args.device, attention_dropout, attention,
                                             compiled=mode != "none", switches=switches)
            with inductor_config.patch(inductor_options(switches)):
                runs[name] = trainer_run(name, model, fast_data, mode, args, flops_per_token)
        except Exception as error:  # one failing option must not lose the other runs of a GPU node's single call
            traceback.print_exc()
            if args.device == "cuda":
                torch.cuda.set_sync_debug_mode(0)  # the failed run may have left it on
            print(f"{name}: failed, {error!r}", flush=True)
            runs[name] = {"failed": repr(error)}
            continue
        runs[name].update(compile_mode=mode, attention_dropout=attention_dropout, attention=attention, **switches)
        runs[name]["ratio"] = round(runs[name]["tokens_per_s"] / runs["baseline"]["tokens_per_s"], 3)
        print(f"ratio {name} / baseline (same batches): {runs[name]['ratio']:.2f}x", flush=True)
    ratio = runs["fast"].get("ratio")  # None when the first fast run failed
    report = {
        "bench": "train_throughput",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": args.device, "device_name": device_name(args.device),
        "torch": torch.__version__, "loadavg_1m": round(os.getloadavg()[0], 2), "size": args.size, "params": params,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
        "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
        "compile_mode": args.compile_mode, "collate_ms": round(collate_ms, 2), "real": args.real, "peak_tflops": args.peak_tflops,
        "flops_per_token": flops_per_token, "runs": runs, "ratio": ratio,
    }
    if args.real and ratio is not None:
        report["ratio_vs_padded"] = round(runs["fast"]["tokens_per_s"] / runs["baseline_padded"]["tokens_per_s"], 3)
        print(f"ratio fast packed / naive padded (useful tokens): {report['ratio_vs_padded']:.2f}x")
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
