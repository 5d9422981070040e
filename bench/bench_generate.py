"""Benchmark: the paper-scale Re-Tuning addition set (about 3.68M records), records/s and peak RSS.

    python bench/bench_generate.py                 # fast path + the whole baseline (a few minutes)
    python bench/bench_generate.py --stride 20     # baseline on 1/20 of the problems, extrapolated

Goal (project issue 2): at most 20 s wall and 1 GB peak RSS on the 2-core machine. For scale, the
authors' notebook pipeline took 74 s and 5.2 GB there for the same set.

Measured, each in its own process (wall clock, CPU time and peak RSS from ``os.wait4``):

* fast: ``data_generation/generate_addition.py --methods retuning --preset paper`` as a user
  runs it (training file, held-out file and meta file);
* baseline, the straightforward generic path: ``protocol.solve`` with the oracle for every
  problem, de-duplication with a set of inputs, ``retuning_copies`` per distinct input, a list
  of record dicts and one ``json.dump`` of it, on the same draw. With ``--stride N`` it runs on
  every N-th problem only and is extrapolated: solving times N, dumping and memory by the ratio
  of records written (rough: a subsample de-duplicates less).

The machine is shared, so the load average is printed with the figures; CPU time is the steadier
number when the machine is busy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAPER_RECORDS = 3_677_455  # SPEC section 2: the authors' Re-Tuning addition file
GOAL_WALL_S, GOAL_RSS_MB = 20.0, 1024.0


def measured(command: list[str]) -> dict:
    """Run a command; its wall time, CPU time, peak RSS (MB) and stdout."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command)} failed with status {process.returncode}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": output}


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def generic_worker(stride: int, out_path: str) -> None:
    """The baseline on every ``stride``-th problem; prints its phases as JSON."""
    from data_generation.pipeline import stream
    from tasks import get_task, protocol

    task = get_task("addition")
    start = time.process_time()
    problems = list(task.training_problems("retuning", "paper", stream(task, "paper", 0, "train")))
    sampling_cpu = time.process_time() - start
    rss_after_sampling = current_rss_mb()
    subsample = problems[::stride]
    del problems
    start = time.process_time()
    rng = stream(task, "paper", 0, "retuning-weights")
    seen, rows = set(), []
    for problem in subsample:
        trace = protocol.solve(task.question(problem), lambda context: task.oracle(context, "retuning"))
        for record_input, output in trace.steps:
            if record_input in seen:
                continue
            seen.add(record_input)
            for _ in range(task.retuning_copies(record_input, "paper", rng)):
                rows.append({"input": record_input, "output": output})
    render_cpu = time.process_time() - start
    start = time.process_time()
    with open(out_path, "w") as handle:
        json.dump(rows, handle)
    print(json.dumps({"sampling_cpu_s": sampling_cpu, "render_cpu_s": render_cpu,
                      "dump_cpu_s": time.process_time() - start, "records": len(rows),
                      "problems": len(subsample), "rss_after_sampling_mb": rss_after_sampling}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=1,
                        help="baseline on every N-th problem, extrapolated (default 1: the whole set, "
                             "about 2 minutes and 2.5 GB)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        generic_worker(args.stride, args.worker)
        return

    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores, shared)")
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".bench-") as folder:
        fast = measured([sys.executable, "data_generation/generate_addition.py", "--methods", "retuning",
                         "--preset", "paper", "--out-dir", folder, "--quiet"])
        with open(os.path.join(folder, "addition_retuning_paper_meta.json")) as handle:
            meta = json.load(handle)
        size_mb = os.path.getsize(os.path.join(folder, "addition_retuning_paper_train.json")) / 2 ** 20
        records = meta["n_train"]
        print(f"fast (generate_addition.py, paper Re-Tuning): {records:,} records "
              f"({(records - PAPER_RECORDS) / PAPER_RECORDS:+.3%} vs the authors' {PAPER_RECORDS:,}), "
              f"{size_mb:.0f} MB JSON, plus {meta['n_test']:,} held-out records")
        print(f"  wall {fast['wall_s']:.1f} s, CPU {fast['cpu_s']:.1f} s, "
              f"{records / fast['wall_s']:,.0f} records/s, peak RSS {fast['peak_rss_mb']:.0f} MB")
        verdict = fast["wall_s"] <= GOAL_WALL_S and fast["peak_rss_mb"] <= GOAL_RSS_MB
        print(f"  goal <= {GOAL_WALL_S:.0f} s wall and <= {GOAL_RSS_MB:.0f} MB: {'met' if verdict else 'NOT met'}"
              + ("" if fast["cpu_s"] <= GOAL_WALL_S else " (CPU time over the goal too)"))
        if args.skip_baseline:
            return
        out_path = os.path.join(folder, "generic.json")
        base = measured([sys.executable, os.path.abspath(__file__), "--worker", out_path,
                         "--stride", str(args.stride)])
        phases = json.loads(base["stdout"])
        label = (f"baseline (generic: protocol.solve + oracle, set de-dup, list of dicts, json.dump)"
                 f"{'' if args.stride == 1 else f' on 1/{args.stride} of the problems'}")
        print(f"{label}: {phases['records']:,} records, wall {base['wall_s']:.1f} s, CPU {base['cpu_s']:.1f} s, "
              f"{phases['records'] / base['wall_s']:,.0f} records/s, peak RSS {base['peak_rss_mb']:.0f} MB")
        wall, cpu, rss = base["wall_s"], base["cpu_s"], base["peak_rss_mb"]
        if args.stride > 1:  # solving scales with problems, dumping and memory with records written
            per_record = records / phases["records"]
            cpu = (phases["sampling_cpu_s"] + phases["render_cpu_s"] * args.stride
                   + phases["dump_cpu_s"] * per_record)
            wall = base["wall_s"] * cpu / base["cpu_s"]
            rss = phases["rss_after_sampling_mb"] + (base["peak_rss_mb"] - phases["rss_after_sampling_mb"]) * per_record
            print(f"  extrapolated (rough) to all {phases['problems'] * args.stride:,} problems and "
                  f"{records:,} records: wall ~{wall:.0f} s, CPU ~{cpu:.0f} s, peak RSS ~{rss:,.0f} MB")
        print(f"ratio baseline / fast: wall x{wall / fast['wall_s']:.1f}, CPU x{cpu / fast['cpu_s']:.1f}, "
              f"peak RSS x{rss / fast['peak_rss_mb']:.1f}")

if __name__ == "__main__":
    main()
