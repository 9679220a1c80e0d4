"""The GPU kit's one entry on the device machine (``bench/gpu/device.sh`` calls it after installing
the carried wheels). Each command runs its stages in order and appends a JSON line to
``OUT/results.jsonl`` as soon as each row is done.

    python3 bench/gpu/run.py --command 1 --out $OUT   # preflight, stage A's captured phase, calibration (part 1)
    python3 bench/gpu/run.py --command 2 --out $OUT   # packing, stage C on fixed specs (no data needed)
    python3 bench/gpu/run.py --command 3 --out $OUT   # stage B on the full CIFAR-10, stage C on its nets
    python3 bench/gpu/run.py --command all --smoke --out /tmp/k   # everything, tiny, on CPU (the test)

Exit status: 0 all rows fine, 1 some row failed (see its ``error``), 2 bad input or missing data
(one line), 3 preflight stopped the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

if __package__ in (None, ""):  # run as a script: make `bench.gpu` and `rayprune` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.gpu.common import (  # noqa: E402  # importable once the repo is on sys.path (above)
    DEFAULT_KIT,
    STATE,
    Clock,
    Results,
    cifar_from_parts,
    run_meta,
)

COMMANDS = {
    "1": ["preflight", "A_capture", "calibrate"],  # "A" (the eager and default-compile phases) on request
    "2": ["packing", "C_fixed"],
    "3": ["B", "C"],
    "all": ["preflight", "A_capture", "A", "calibrate", "packing", "C_fixed", "B", "C"],
}
# Wall budgets (s) from process start; the device tool's timeout_s (prepare prints it) is larger.
BUDGETS = {"1": 200.0, "2": 180.0, "3": 300.0, "all": None}
# Each stage's own cap (s), within the command's budget: a slow stage cannot starve the next one.
STAGE_CAPS = {"A_capture": 140.0, "A": 70.0, "calibrate": 25.0, "packing": 110.0, "C_fixed": 60.0}
CALIBRATION = "calibration.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--command", choices=list(COMMANDS), default=None, help="which device command's stages to run")
    p.add_argument("--stages", default=None, help="comma list overriding --command: " + ",".join(COMMANDS["all"]))
    p.add_argument("--out", type=Path, required=True, help="results.jsonl goes here ($OUT on the device)")
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the .gpukit folder (parts, wheels, state)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU, synthetic data")
    p.add_argument(
        "--data",
        choices=["parts", "synthetic"],
        default=None,
        help="CIFAR-10 from the kit's parts (default) or synthetic (default with --smoke)",
    )
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--budget-s", type=float, default=None, help="wall budget of this command (default per command)")
    p.add_argument(
        "--epoch-time-s",
        type=float,
        default=None,
        help="stage B: seconds per ResNet-20 epoch (default: stage A's calibration saved on this machine)",
    )
    p.add_argument(
        "--compile-budget-s", type=float, default=90.0, help="stage A: total seconds for torch.compile phases"
    )
    p.add_argument("--no-compile", action="store_true", help="stage A: skip the torch.compile phases")
    p.add_argument("--steps", type=int, default=None, help="stage A: steps per chunk (default 40; smoke 3)")
    p.add_argument("--rounds", type=int, default=None, help="stage A: interleaved rounds (default 7; smoke 2)")
    p.add_argument("--kd-weight", type=float, default=None, help="stage B: override KD_WEIGHT")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 with --smoke, which on a loaded CPU is "
        "several times faster than spinning OpenMP threads)",
    )
    p.add_argument("--preflight-methods", default=None, help="comma list of methods preflight steps (default: all)")
    p.add_argument("--no-stage-caps", action="store_true", help="stages share the command's budget without caps")
    p.add_argument(
        "--capture-batches", default=None, help="stage A's captured phase: comma list of batch sizes (default 128,512)"
    )
    args = p.parse_args(argv)
    if args.stages is None and args.command is None:
        p.error("give --command 1|2|3|all or --stages")
    return args


class Kit:
    """Shared state of one command: results, clock, device, data (loaded once, on first need)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.smoke = args.smoke
        threads = args.threads or (1 if args.smoke else None)
        if threads:
            torch.set_num_threads(threads)
        self.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        name = args.command or "custom"
        budget = args.budget_s if args.budget_s is not None else BUDGETS.get(name)
        self.clock = Clock(budget, start=T_START)
        self.results = Results(args.out, run_meta(args.kit, self.device, name))
        self.kit = args.kit
        self.data_mode = args.data or ("synthetic" if args.smoke else "parts")
        self._data: tuple[Any, Any, dict] | None = None
        self.failed = 0
        self.stage_cap: float | None = None
        self.stage_start = time.perf_counter()

    def start_stage(self, stage: str) -> None:
        self.stage_start = time.perf_counter()
        self.stage_cap = None if self.args.no_stage_caps else STAGE_CAPS.get(stage)

    def left(self) -> float:
        """Seconds left to the running stage: its cap or the command's budget, whichever is first."""
        left = self.clock.left()
        if self.stage_cap is not None:
            left = min(left, self.stage_cap - (time.perf_counter() - self.stage_start))
        return left

    def emit(self, stage: str, **row: Any) -> dict[str, Any]:
        if row.get("error") or row.get("ok") is False:
            self.failed += 1
        return self.results.add(stage, **row)

    def data(self, need_test: bool) -> tuple[Any, Any, dict]:
        if self._data is None or (need_test and self._data[1] is None):
            if self.data_mode == "synthetic":
                from rayprune.engine.data import synthetic_dataset

                # Smoke: 16 px keeps every stage to seconds on a CPU; otherwise CIFAR-sized.
                n, m, size = (200, 64, 16) if self.smoke else (5000, 1000, 32)
                train, test = synthetic_dataset(n_train=n, n_test=m, num_classes=10, size=size, seed=0)
                self._data = (train, test, {"source": "synthetic", "train_n": len(train), "test_n": len(test)})
            else:
                train, test, info = cifar_from_parts(self.kit, need_test=need_test)
                if self.smoke:  # a small slice of the real parts
                    import torch

                    train = train.subset(torch.arange(min(512, len(train))))
                    test = test.subset(torch.arange(min(256, len(test)))) if test is not None else None
                self._data = (
                    train,
                    test,
                    {"source": "parts", **info, "train_n": len(train), "test_n": len(test) if test is not None else 0},
                )
        return self._data

    # -- stages ------------------------------------------------------------------------------
    def preflight(self) -> bool:
        from bench.gpu.preflight import preflight

        methods = self.args.preflight_methods.split(",") if self.args.preflight_methods else None
        ok, _ = preflight(self.device, lambda **r: self.emit("preflight", **r), smoke=self.smoke, methods=methods)
        return ok

    def stage_a(self) -> None:
        import torch

        from bench.gpu import throughput

        train, _, info = self.data(need_test=False)
        a = self.args
        emit = lambda **r: self.emit("A", data=info["source"], **r)  # noqa: E731  # a partial of self.emit
        compile_settings = (
            () if a.no_compile or (self.smoke and self.device == "cpu") else ("bf16_cl_compile", "fp32_compile")
        )
        throughput.stage_a(
            train,
            torch.device(self.device),
            emit,
            model="cifar_resnet:tiny" if self.smoke else throughput.MODEL,
            steps=a.steps or (3 if self.smoke else 40),
            batch_size=16 if self.smoke else 128,
            rounds=a.rounds or (2 if self.smoke else 7),
            compile_settings=compile_settings,
            compile_budget_s=a.compile_budget_s,
            left=lambda: self.left() - 20,
            workers=1 if self.smoke else None,
        )

    def stage_a_capture(self) -> None:
        import torch

        from bench.gpu import throughput

        train, _, info = self.data(need_test=False)
        a = self.args
        default_batches = "16,32" if self.smoke else "128,512"
        throughput.capture_phase(
            train,
            torch.device(self.device),
            lambda **r: self.emit("A", data=info["source"], **r),
            model="cifar_resnet:tiny" if self.smoke else throughput.MODEL,
            batch_sizes=tuple(int(b) for b in (a.capture_batches or default_batches).split(",")),
            steps=a.steps or (3 if self.smoke else 40),
            rounds=a.rounds or (2 if self.smoke else 5),
            reduce_overhead=not (a.no_compile or self.device == "cpu"),
            compile_limit_s=a.compile_budget_s,
            left=self.left,
            workers=1 if self.smoke else None,
        )

    def packing(self) -> None:
        from bench.gpu import packing

        emit = lambda **r: self.emit("packing", **r)  # noqa: E731  # a partial of self.emit
        work = self.kit / STATE / "packing"
        work.mkdir(parents=True, exist_ok=True)
        if self.smoke:
            packing.stage_packing(
                self.device,
                emit,
                work,
                processes=(1, 2),
                model="cifar_resnet:tiny",
                batch_size=16,
                steps=2,
                seconds=0.5,
                warmup_s=2.0,  # a worker still importing then starts late (its row's late_start_s)
                input_size=16,
                left=self.left,
            )
        else:
            packing.stage_packing(self.device, emit, work, left=self.left)

    def calibrate(self) -> None:
        import torch

        from bench.gpu import stage_b, throughput

        train, _, _ = self.data(need_test=False)
        model = "cifar_resnet:tiny" if self.smoke else stage_b.MODEL
        cal = throughput.calibrate(
            train,
            torch.device(self.device),
            model,
            stage_b.SHORTCUT,
            stage_b.FINETUNE_RECIPE["batch_size"],
            steps=3 if self.smoke else 60,
        )
        row = self.emit("calibrate", **cal)
        state = self.kit / STATE
        state.mkdir(parents=True, exist_ok=True)
        (state / CALIBRATION).write_text(json.dumps({**cal, "time": row["time"], "smoke": self.smoke}) + "\n")

    def saved_epoch_s(self, model: str) -> tuple[float | None, str]:
        if self.args.epoch_time_s:
            return self.args.epoch_time_s, "--epoch-time-s"
        f = self.kit / STATE / CALIBRATION
        if f.is_file():
            cal = json.loads(f.read_text())
            if (
                cal.get("model") == model
                and cal.get("device", "").split(":")[0] == self.device.split(":")[0]
                and bool(cal.get("smoke")) == self.smoke
            ):
                return float(cal["epoch_s"]), f"calibration ({cal.get('time')})"
        return None, "default (no calibration found)"

    def stage_c_fixed(self) -> None:
        import torch

        from bench.gpu import stage_c

        emit = lambda **r: self.emit("C", **r)  # noqa: E731  # a partial of self.emit
        if self.smoke:
            stage_c.stage_c_fixed(
                torch.device(self.device),
                emit,
                fixed_models=("cifar_resnet:tiny",),
                warmup=1,
                repeats=3,
                left=self.left,
                input_size=16,
                batch_sizes=(1, 64),
                ort_threads=(1,),
            )
        else:
            stage_c.stage_c_fixed(torch.device(self.device), emit, left=self.left)

    def stage_b(self) -> None:
        from bench.gpu import stage_b

        train, test, info = self.data(need_test=True)
        model = "cifar_resnet:tiny" if self.smoke else stage_b.MODEL
        epoch_s, source = self.saved_epoch_s(model)
        self.b_rows = stage_b.stage_b(
            train,
            test,
            self.device,
            lambda **r: self.emit("B", **r),
            left=self.left,
            epoch_s=epoch_s,
            epoch_source=source,
            smoke=self.smoke,
            model=model,
            data_info=info,
            kd_weight=self.args.kd_weight,
        )

    def stage_c(self) -> None:
        import torch

        from bench.gpu import stage_c

        rows = [r for r in getattr(self, "b_rows", []) if r.get("spec") and r.get("kind") == "arm"]
        teacher = [r for r in rows if r.get("arm") == "teacher"]
        if not teacher:
            self.emit("C", kind="skipped", reason="no stage-B teacher row (stage B did not run or failed)")
            return
        nets = [(f"B:{r['arm']}", r["spec"]) for r in rows if r.get("arm") != "teacher"]
        train, _, _ = self.data(need_test=False)
        stage_c.latency_table(
            ("B:teacher", teacher[0]["spec"]),
            nets,
            torch.device(self.device),
            lambda **r: self.emit("C", **r),
            warmup=1 if self.smoke else 10,
            input_size=train.input_size,
            repeats=3 if self.smoke else 50,
            left=self.left,
            group="stage_b",
            **({"batch_sizes": (1, 64), "ort_threads": (1,)} if self.smoke else {}),
        )


STAGE_FUNCS = {
    "preflight": Kit.preflight,
    "A_capture": Kit.stage_a_capture,
    "A": Kit.stage_a,
    "packing": Kit.packing,
    "calibrate": Kit.calibrate,
    "C_fixed": Kit.stage_c_fixed,
    "B": Kit.stage_b,
    "C": Kit.stage_c,
}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stages = args.stages.split(",") if args.stages else COMMANDS[args.command]
    unknown = [s for s in stages if s not in STAGE_FUNCS]
    if unknown:
        print(f"run: error: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGE_FUNCS)}", file=sys.stderr)
        return 2
    try:
        kit = Kit(args)
    except Exception as e:  # torch itself unusable here: nothing can run
        print(f"run: error: cannot start ({type(e).__name__}: {e})", flush=True)
        return 3
    m = kit.results.meta
    print(
        f"run: command {args.command or 'custom'} stages {','.join(stages)} on {kit.device} "
        f"({m.get('gpu') or 'no GPU'}), torch {m['torch']}, git {str(m.get('git_sha'))[:12]} "
        f"({m.get('git_source')}), code {m['code_hash']}, budget {kit.clock.budget_s} s, "
        f"results {kit.results.path}",
        flush=True,
    )
    status = 0
    for stage in stages:
        t0 = time.perf_counter()
        kit.start_stage(stage)
        print(f"run: stage {stage} starts at {kit.clock.elapsed():.0f} s (cap {kit.stage_cap} s)", flush=True)
        try:
            ok = STAGE_FUNCS[stage](kit)
        except FileNotFoundError as e:  # missing data parts: one clear line, the other stages still run
            kit.emit(stage, kind="error", error=f"missing data: {e}")
            print(f"run: error: stage {stage}: {e}", flush=True)
            status = 2
            continue
        except Exception as e:
            kit.emit(
                stage, kind="error", error=f"{type(e).__name__}: {e}"[:1000], traceback=traceback.format_exc()[-3000:]
            )
            print(f"run: stage {stage} FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            print(f"run: stage {stage} took {time.perf_counter() - t0:.1f} s", flush=True)
        if stage == "preflight" and ok is False:
            status = 3
            break
    from bench.gpu.collect import summary

    print(summary(kit.results.rows), flush=True)
    print(
        f"run: done in {kit.clock.elapsed():.0f} s; {len(kit.results.rows)} rows, {kit.failed} failed; "
        f"{kit.results.path}",
        flush=True,
    )
    if status:
        return status
    return 1 if kit.failed else 0


if __name__ == "__main__":
    sys.exit(main())
