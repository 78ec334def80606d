"""Builds the git-ignored folder that bench/gpu_run.sh reads on a GPU node.

A GPU node of the kind these benchmarks ran on reaches no network and receives at
most 64 MiB with the checkout, so what it lacks travels in ``.devcarry/``:

* ``inputs/``: the canonical Financial PhraseBank split and the Reuters-21578 texts
  (``bench/accuracy.py --export-inputs``);
* ``minilm-fp16/``: the offline all-MiniLM-L6-v2 with its weights stored in float16
  (the float32 file is 87 MiB); gpu_run.sh upcasts every weight back to float32
  before training;
* ``whl/``: Python 3.12 wheels of what the node's image lacks (pydantic,
  pydantic-settings, datasets and their small dependencies, pytest for the GPU-only tests),
  at this lock's versions.

    python bench/prepare_gpu_inputs.py            # then: run bench/gpu_run.sh there
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHEELS = ("pydantic", "pydantic_core", "pydantic-settings", "python-dotenv", "typing-inspection", "annotated-types",
          "datasets", "dill", "multiprocess", "pytest", "pluggy", "iniconfig", "pygments")
TOKENIZER_FILES = ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def locked_versions(names: tuple[str, ...]) -> list[str]:
    wanted = {name.lower().replace("_", "-") for name in names}
    pins = [line.split(";")[0].strip() for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line]
    return [pin for pin in pins if pin.split("==")[0].lower().replace("_", "-") in wanted]


def half_precision_base(out: Path) -> None:
    from safetensors.torch import load_file, save_file

    from pipeline.config import OFFLINE_MINILM
    from pipeline.bases import resolve_base_model

    source = Path(resolve_base_model(OFFLINE_MINILM))
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    weights = load_file(source / "model.safetensors")
    half = {name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()}
    worst = max(float((half[n].float() - t).abs().max() / t.abs().max().clamp_min(1e-12))
                for n, t in weights.items() if t.is_floating_point())
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    print(f"{out}: float16 weights, largest rounding error {worst:.2e} of a tensor's largest weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".devcarry")
    args = parser.parse_args()
    from bench.accuracy import main as accuracy_main

    accuracy_main(["--export-inputs", str(args.out / "inputs")])
    half_precision_base(args.out / "minilm-fp16")
    pins = locked_versions(WHEELS)
    subprocess.run([
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "-d", str(args.out / "whl"), *pins,
    ], check=True)
    print(f"{args.out / 'whl'}: {', '.join(pins)}")


if __name__ == "__main__":
    main()
