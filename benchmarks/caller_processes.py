"""Several caller processes in front of the same devices (trtforge/bench/callers.py): throughput of
P processes, each with its own Runtime over every device, against one.

    python benchmarks/caller_processes.py ARTIFACT --devices 2 --batch 32 --processes 1,2,4 --out DIR
        [--sequence 128] [--iterations 2000] [--outputs host] [--cpu]

ARTIFACT: a built artifact (trtforge build RECIPE --out DIR makes DIR/NAME). --batch is per device
(a request holds batch x devices rows, as in trtforge bench). --cpu: CPU workers instead of GPUs.
Writes caller-processes.json and caller-processes.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--outputs", choices=["host", "device"], default="host")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from trtforge.bench.callers import measure_processes

    devices = args.devices if args.cpu else [f"cuda:{i}" for i in range(args.devices)]
    runs = []
    for count in (int(p) for p in args.processes.split(",")):
        run = measure_processes(args.artifact, devices=devices, rows=args.batch * args.devices, sequence=args.sequence,
                                processes=count, iterations=args.iterations, outputs=args.outputs)
        print(json.dumps(run), flush=True)
        runs.append(run)
    gpus = []
    if not args.cpu:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(args.devices)]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv),
              "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caller-processes.json").write_text(json.dumps(report, indent=2) + "\n")
    first = runs[0]["throughput"]
    lines = ["# Caller processes in front of the same devices", "",
             f"{report['date']}, {', '.join(gpus) or str(args.devices) + ' CPU workers'}, {os.cpu_count()} CPUs; "
             f"`{report['command']}`. Each process opens its own Runtime over every device; a request is "
             f"{args.batch} x {args.devices} rows of {args.sequence} tokens, outputs to {args.outputs}.", "",
             "| caller processes | sequences/s, all together | vs one process | caller CPU % of each |", "|---|---|---|---|"]
    for run in runs:
        cpu = ", ".join(str(p["caller_cpu_percent"]) for p in run["per_process"])
        lines.append(f"| {run['processes']} | {run['throughput']:.0f} | {run['throughput'] / first:.2f} | {cpu} |")
    (args.out / "caller-processes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
