"""Which torchvision classification models the traced family takes (issue 22).

Every name in ``torchvision.models.list_models(module=torchvision.models)`` goes through: trace at
``--size`` px (the dependency graph, checked by the family itself), exact counts of the full and
the halved net (``FlopCounterMode`` plus bias terms, ``sum(numel)``, on the meta device: the
family's own check when it traces, repeated here with ``--recount``) and a
transfer round trip (extract a halved subnet, strict ``load_state_dict``, write back). Each model
runs in a forked child, so its trace time and peak memory (growth of the child's peak RSS) are its
own. Prints one Markdown row per model: pass, or the one-line refusal.

    python bench/torchvision_coverage.py --size 64 --out bench/results/torchvision_coverage.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayprune import models
from rayprune.errors import RaypruneError
from rayprune.models.tiles import per_block_prefix
from rayprune.models.transfer import extract_subnet, write_back


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def built(spec: models.Spec) -> torch.nn.Module:
    """The net of ``spec`` on the meta device (shapes only), or on the CPU for a factory that
    initialises from data (regnet's, for one) and so cannot run there."""
    try:
        with torch.device("meta"):
            return models.build(spec)
    except RaypruneError:
        return models.build(spec)


def counts_match(spec: models.Spec, size: int) -> bool:
    net = built(spec).eval()
    x = torch.empty(1, 3, size, size, device=next(net.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    bias = sum(layer.bias_macs for layer in models.layers(spec, size))
    macs_ok = counter.get_total_flops() == 2 * (models.macs(spec, size) - bias)
    return macs_ok and models.params(spec) == sum(p.numel() for p in net.parameters())


def halved(g: models.ChannelGroup) -> int:
    """Half the group's width, a multiple of its divisor (a grouped conv's group count)."""
    return max(g.divisor, g.width // 2 // g.divisor * g.divisor)


def transfer_round_trip(full: models.Spec) -> bool:
    state = built(full).state_dict()
    keep = {}  # every other channel (of each block, for a grouped conv's group)
    for g in models.channel_groups(full):
        evens_first = torch.cat([torch.arange(0, g.width, 2), torch.arange(1, g.width, 2)])
        keep[g.name] = per_block_prefix(evens_first, halved(g), g.width, g.tiles)
    sub_spec, sub_state = extract_subnet(full, state, keep)
    built(sub_spec).load_state_dict(sub_state, strict=True)
    write_back(full, state, keep, sub_state)
    return True


def check(name: str, size: int, recount: bool) -> dict[str, Any]:
    base = rss_mib()
    start = time.perf_counter()
    try:
        full = models.full_spec(f"torchvision:{name}", num_classes=10, input_size=size)
    except RaypruneError as e:
        return {"result": f"refused: {e}", "trace_s": time.perf_counter() - start, "peak_mib": rss_mib() - base}
    trace_s = time.perf_counter() - start
    # Tracing already compared the full and the halved net's counts with FlopCounterMode and
    # refused on a difference; --recount repeats that here, independently of the family.
    half = models.with_widths(full, {g.name: halved(g) for g in models.channel_groups(full)})
    ok = (not recount or (counts_match(full, size) and counts_match(half, size))) and transfer_round_trip(full)
    groups = models.channel_groups(full)
    return {
        "result": "pass" if ok else "FAIL: counts differ",
        "groups": len(groups),
        "stages": 1 + max(g.stage for g in groups),
        "macs": models.macs(full, size),
        "trace_s": trace_s,
        "peak_mib": rss_mib() - base,
    }


def child(name: str, size: int, recount: bool, queue: Any) -> None:
    try:
        queue.put(check(name, size, recount))
    except Exception as e:  # a bug shows in the table rather than stopping the run
        queue.put({"result": f"ERROR {type(e).__name__}: {str(e)[:200]}"})


def run_one(name: str, size: int, timeout: float, recount: bool) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(name, size, recount, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"result": f"timeout after {timeout:.0f} s"}
    return queue.get() if not queue.empty() else {"result": f"crashed (exit {proc.exitcode})"}


def row(name: str, r: dict[str, Any]) -> str:
    cells = [
        name,
        r["result"].replace("|", "\\|"),
        str(r.get("groups", "")),
        str(r.get("stages", "")),
        f"{r['macs']:,}" if "macs" in r else "",
        f"{r['trace_s']:.1f}" if "trace_s" in r else "",
        f"{r['peak_mib']:.0f}" if "peak_mib" in r else "",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--only", nargs="*", help="these model names only")
    parser.add_argument("--recount", action="store_true", help="count the full and halved nets again here")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    names = args.only or torchvision.models.list_models(module=torchvision.models)
    lines = [
        f"torchvision {torchvision.__version__}, torch {torch.__version__}, {args.size} px, 10 classes, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.0f} at the start",
        "",
        "| model | result | groups | stages | MACs | trace s | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    passed = 0
    for done, name in enumerate(names, 1):
        r = run_one(name, args.size, args.timeout, args.recount)
        passed += r["result"] == "pass"
        lines.append(row(name, r))
        print(lines[-1], flush=True)
        if args.out:  # rewritten after every model, so an interrupted run leaves its rows
            tail = f"{passed} of {done} pass" + ("." if done == len(names) else f" ({len(names) - done} not run yet).")
            args.out.write_text("\n".join([*lines, "", tail]) + "\n")
    print(f"{passed} of {len(names)} pass.")


if __name__ == "__main__":
    main()
