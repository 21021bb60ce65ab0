#!/usr/bin/env python3
"""Write a synthetic safetensors model (float16 tensors, sharded like Hugging Face models).

    python scripts/make_model.py OUT_DIR [--size 512M] [--shards 2] [--seed 0]

Writes OUT_DIR/model-0000i-of-0000N.safetensors, model.safetensors.index.json and a small
config.json. Deterministic for a given seed, so benchmarks and tests can rebuild it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from chunkfs.units import parse_size

TENSOR_BYTES = 32 << 20  # like a large projection matrix in fp16


def make_model(out: Path, size: int, shards: int, seed: int = 0) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_shard = size // shards
    weight_map, paths = {}, []
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors, left, index = {}, per_shard, 0
        while left > 0:
            nbytes = min(TENSOR_BYTES, left)
            count = max(1, nbytes // 2)
            tensor_name = f"layers.{shard}.{index}.weight"
            tensors[tensor_name] = rng.standard_normal(count, dtype=np.float32).astype(np.float16)
            weight_map[tensor_name] = name
            left -= count * 2
            index += 1
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        paths.append(out / name)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps({"model_type": "synthetic", "torch_dtype": "float16"}))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="512M")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in make_model(args.out, parse_size(args.size), args.shards, args.seed):
        print(path)


if __name__ == "__main__":
    main()
