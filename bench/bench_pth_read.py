"""Time and peak memory of convert.pth_io.read_pth against torch.load on a ViT-L-sized checkpoint.

Run from the repository root: `python bench/bench_pth_read.py [--repeats 5]`.
It writes a random float32 state dict with the mae_vit_large_patch16 key layout (about 330M numbers,
1.3 GB) with torch.save into a temporary directory, then loads it in fresh subprocesses, alternating
torch.load(weights_only=True, mmap=False) and read_pth, and prints the medians and the ratios.
Peak memory is the child's VmHWM, the peak RSS of its own address space. Its ru_maxrss is printed
too, but Linux carries ru_maxrss over from the parent across fork and exec, so it reads at least the
parent's size; that is why this parent never imports torch and a third child writes the file.
"added" subtracts the child's RSS just before the load (interpreter and imports): the memory the
load itself needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in a child process: argv[1] is "torch" or "pth_io", argv[2] the file.
CHILD = r"""
import json, resource, sys, time
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
which, path = sys.argv[1], sys.argv[2]
if which == "torch":
    import torch
    load = lambda: torch.load(path, weights_only=True, mmap=False, map_location="cpu")
    count = lambda sd: sum(t.numel() for t in sd["model"].values())
else:
    from convert.pth_io import read_pth
    load = lambda: read_pth(path)
    count = lambda sd: sum(a.size for a in sd["model"].values())
before = status_kib("VmRSS")
start = time.perf_counter()
state = load()
seconds = time.perf_counter() - start
peak = status_kib("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kib": peak, "maxrss_kib": maxrss,
                  "before_kib": before, "numel": count(state)}))
"""


def vit_large_shapes() -> dict[str, tuple[int, ...]]:
    """The mae_vit_large_patch16 state_dict layout: 24 encoder blocks of 1024, 8 decoder of 512."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, 1024),
        "pos_embed": (1, 197, 1024),
        "patch_embed.proj.weight": (1024, 3, 16, 16),
        "patch_embed.proj.bias": (1024,),
    }

    def block(prefix: str, dim: int) -> None:
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.{norm}.weight"] = (dim,)
            shapes[f"{prefix}.{norm}.bias"] = (dim,)
        shapes[f"{prefix}.attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"{prefix}.attn.qkv.bias"] = (3 * dim,)
        shapes[f"{prefix}.attn.proj.weight"] = (dim, dim)
        shapes[f"{prefix}.attn.proj.bias"] = (dim,)
        shapes[f"{prefix}.mlp.fc1.weight"] = (4 * dim, dim)
        shapes[f"{prefix}.mlp.fc1.bias"] = (4 * dim,)
        shapes[f"{prefix}.mlp.fc2.weight"] = (dim, 4 * dim)
        shapes[f"{prefix}.mlp.fc2.bias"] = (dim,)

    for i in range(24):
        block(f"blocks.{i}", 1024)
    shapes |= {
        "norm.weight": (1024,),
        "norm.bias": (1024,),
        "mask_token": (1, 1, 512),
        "decoder_embed.weight": (512, 1024),
        "decoder_embed.bias": (512,),
        "decoder_pos_embed": (1, 197, 512),
    }
    for i in range(8):
        block(f"decoder_blocks.{i}", 512)
    shapes |= {
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    return shapes


def write_random_checkpoint(path: Path) -> None:
    """torch.save a {'model': state_dict} of N(0, 1) float32 tensors in the ViT-L layout."""
    import torch

    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator) for k, s in vit_large_shapes().items()}
    torch.save({"model": state}, path)


def run_child(which: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="loads per loader (median reported)")
    parser.add_argument("--write", metavar="PATH", help=argparse.SUPPRESS)  # the writer child
    args = parser.parse_args()
    if args.write:
        write_random_checkpoint(Path(args.write))
        return

    numel = sum(math.prod(shape) for shape in vit_large_shapes().values())
    with tempfile.TemporaryDirectory(prefix="bench_pth_") as directory:
        path = Path(directory) / "mae_vit_large_random.pth"
        subprocess.run([sys.executable, __file__, "--write", str(path)], check=True)
        size = path.stat().st_size
        print(
            f"file: {len(vit_large_shapes())} tensors, {numel / 1e6:.1f}M float32, {size / 1e9:.3f} GB"
        )
        with open(path, "rb") as file:  # warm the page cache so neither loader pays for the disk
            while file.read(1 << 26):
                pass

        runs: dict[str, list[dict]] = {"torch": [], "pth_io": []}
        for _ in range(args.repeats):
            for which in runs:
                result = run_child(which, path)
                if result["numel"] != numel:
                    raise SystemExit(f"{which} loaded {result['numel']} numbers, expected {numel}")
                runs[which].append(result)

    summary = {}
    for which, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        peak = statistics.median(r["peak_kib"] for r in results) * 1024
        added = statistics.median(r["peak_kib"] - r["before_kib"] for r in results) * 1024
        maxrss = statistics.median(r["maxrss_kib"] for r in results) * 1024
        summary[which] = (seconds, peak, added)
        times = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(
            f"{which:>7}: {seconds:5.2f} s (runs: {times}); peak RSS {peak / 1e9:.2f} GB, "
            f"of which the load added {added / 1e9:.2f} GB = {added / size:.2f}x the file "
            f"(ru_maxrss {maxrss / 1e9:.2f} GB)"
        )
    (t_torch, p_torch, a_torch), (t_ours, p_ours, a_ours) = summary["torch"], summary["pth_io"]
    print(
        f"read_pth / torch.load: time {t_ours / t_torch:.2f}x, peak RSS {p_ours / p_torch:.2f}x, "
        f"added memory {a_ours / a_torch:.2f}x; read_pth peak RSS / file size {p_ours / size:.2f}"
    )


if __name__ == "__main__":
    main()
