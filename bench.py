"""
Benchmarks, measured side by side in one run (ratios, not absolute targets, are what to compare).

    python bench.py vae                                # tiled vs untiled VAE decode: peak memory, time
    python bench.py vae --config sd3 --size 2048       # the SD3 VAE at 2048 x 2048 (a GPU)

Each case runs in a fresh subprocess, so one case's peak memory cannot hide another's: on CUDA the
peak is torch.cuda.max_memory_allocated above the weights, on the CPU the growth of the process's
peak resident memory (ru_maxrss). Weights are random: time and memory do not depend on values.
"""

import argparse
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, time
import torch
import vae as vae_lib
from sample import pick_device, pick_dtype
args = json.loads(sys.argv[1])
device = pick_device(args["device"])
dtype = pick_dtype(args["dtype"], device)
torch.manual_seed(0)
model = vae_lib.VAE(args["config"]).to(device, dtype).eval()
f = model.config.factor
z = torch.randn(1, model.config.z_channels, args["size"] // f, args["size"] // f, device=device)
def peak():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated() if device.type == "cuda" else peak()
t0 = time.time()
with torch.no_grad():
    img = model.decode(z, tile=args["tile"] or None)
if device.type == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.time() - t0, "peak_bytes": peak() - base,
                  "shape": list(img.shape), "device": str(device), "dtype": str(dtype)}))
"""


def run_case(args, tile):
    spec = json.dumps({"config": args.config, "size": args.size, "tile": tile,
                       "device": args.device, "dtype": args.dtype})
    out = subprocess.run([sys.executable, "-c", CASE, spec], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: the benchmark case (tile={tile}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_vae(args):
    rows = [("untiled", run_case(args, 0)), (f"tiled {args.tile}", run_case(args, args.tile))]
    dev = rows[0][1]["device"] + " " + rows[0][1]["dtype"]
    print(f"VAE decode, config {args.config}, {args.size}x{args.size} px, {dev}")
    print("| mode | peak memory (MiB) | seconds |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} |")
    a, b = rows[0][1], rows[1][1]
    print(f"tiled / untiled: memory {b['peak_bytes'] / max(a['peak_bytes'], 1):.2f}x, "
          f"time {b['seconds'] / a['seconds']:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("vae", help="tiled vs untiled VAE decode")
    v.add_argument("--config", default="shapes", help="vae.CONFIGS name")
    v.add_argument("--size", type=int, default=1024, help="image side in pixels")
    v.add_argument("--tile", type=int, default=64, help="tile side in latent pixels")
    v.add_argument("--device", default="auto")
    v.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    if args.what == "vae":
        bench_vae(args)


if __name__ == "__main__":
    main()
