#!/usr/bin/env python3
"""Load every safetensors shard of a model directory, as an inference server does at start.

    python scripts/load_model.py MODEL_DIR [--compare SOURCE_DIR] [--json]

Prints the load time and throughput; with --compare, checks every tensor is bit-identical
to the one in SOURCE_DIR and exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def load_model(model: Path) -> tuple[dict[str, np.ndarray], int, float]:
    shards = sorted(model.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"error: no .safetensors files in {model}")
    start = time.perf_counter()
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    seconds = time.perf_counter() - start
    return tensors, sum(s.stat().st_size for s in shards), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tensors, nbytes, seconds = load_model(args.model)
    differing = []
    if args.compare:
        reference, _, _ = load_model(args.compare)
        differing = [k for k in reference if k not in tensors or
                     not np.array_equal(reference[k].view(np.uint16), tensors[k].view(np.uint16))]
    result = {"tensors": len(tensors), "bytes": nbytes, "seconds": round(seconds, 3),
              "mib_per_s": round(nbytes / seconds / 2**20, 1), "differing": differing}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loaded {len(tensors)} tensors ({nbytes / 2**20:.0f} MiB) in {seconds:.2f} s "
              f"({result['mib_per_s']} MiB/s)" + (", all equal to the source" if args.compare and not differing
                                                  else ""))
    if differing:
        print(f"error: {len(differing)} tensors differ, e.g. {differing[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
