"""The whole pipeline at toy size: data, three trainings, three evaluations, figure and summary."""
import json
import os
import re
import shutil
import subprocess
import sys

from omegaconf import OmegaConf

from reproduce import override_value
from train import compose_config  # the repository root is on sys.path (conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY = [
    "task=addition", "tasks.addition.small.lengths=1-2", "tasks.addition.small.train_steps=null", "tasks.addition.small.eval_lengths=1-3",
    "tasks.addition.small.eval_samples=2", "eval.batch_size=16",
    # A very small model and a few steps: this checks the plumbing, not the science.
    "train_args=[" + ",".join(f"'{item}'" for item in [
        "model.llama_config.hidden_size=32",
        "model.llama_config.intermediate_size=64",
        "model.llama_config.num_hidden_layers=1",
        "model.llama_config.num_attention_heads=2",
        "n_examples=64",
        "batch_size=16",
        "eval_every=32",
        "n_eval_examples=16",
        "eval_batch_size=16",
        "warmup_steps=1",
        "compile=false",  # the reproduction's; test_train.py checks it, and here it would cost a minute
    ]) + "]",
]


def run_reproduce(tmp_path, *extra, check=True):
    args = [sys.executable, os.path.join(REPO, "reproduce.py"), f"data_dir={tmp_path}/data",
            f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results", *TOY, *extra]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 or not check, done.stderr[-3000:]
    return done


def test_toy_pipeline_outputs_are_complete_and_consistent(tmp_path):
    run_reproduce(tmp_path)
    assert not (tmp_path / "reproduce.log").exists()  # Hydra's log file, written where it started
    out = tmp_path / "results" / "addition"
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in summary.splitlines() if re.match(r"\| (Baseline|Scratchpad|Re-Tuning) ", line)}
    assert set(rows) == {"Baseline", "Scratchpad", "Re-Tuning"}
    for method, label in [("baseline", "Baseline"), ("scratchpad", "Scratchpad"), ("retuning", "Re-Tuning")]:
        results = json.loads((out / method / "results.json").read_text())
        assert results["method"] == method and results["task"] == "addition"
        assert sorted(int(n) for n in results["lengths"]) == [1, 2, 3]
        meta = json.loads((tmp_path / "data" / f"addition_{method}_small_meta.json").read_text())
        trained_lengths = results["settings"]["train_lengths"]
        assert trained_lengths == meta["train_lengths"] and min(trained_lengths) == 1
        assert all(row["problems"] == 2 for row in results["lengths"].values())
        # The summary's columns are the results pooled over the trained lengths and beyond them.
        def pooled(keep):
            rows_kept = [row for n, row in results["lengths"].items() if keep(int(n))]
            if not rows_kept:
                return "-"
            return f"{100 * sum(r['correct'] for r in rows_kept) / sum(r['problems'] for r in rows_kept):.1f}%"
        assert rows[label][0] == pooled(lambda n: n <= max(trained_lengths))
        assert rows[label][1] == pooled(lambda n: n > max(trained_lengths))
        # Records trained: the toy run's 64 records, as the checkpoint says.
        state = json.loads((tmp_path / "runs" / f"addition_{method}_small_tiny_seed0" / "final" /
                            "trainer_state.json").read_text())
        assert state["records_seen"] == 64 and rows[label][3] == "64"
    # Re-Tuning records are shorter than the scratchpad's (the paper's token argument).
    tokens_per_record = {label: float(cells[5]) for label, cells in rows.items()}
    assert tokens_per_record["Re-Tuning"] < tokens_per_record["Scratchpad"]

    # A second run finds every step done: nothing is trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("model.safetensors")}
    stamps.update({p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("results.json")})
    again = run_reproduce(tmp_path)
    assert "train.py" not in again.stdout + again.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # Re-Tuning alone: the comparison keeps the other two methods' results of the earlier run,
    # and says so; with other evaluation settings they are no longer this comparison's.
    run_reproduce(tmp_path, "methods=[retuning]")
    again = (out / "summary.md").read_text()
    assert again.startswith(summary) and "Baseline, Scratchpad: not run this time" in again[len(summary):]
    run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.eval_samples=3")
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["Re-Tuning"]
    # Nor with other training settings (here the data's lengths, for every method): Re-Tuning,
    # trained anew on them, is not compared with models trained on the old data.
    shutil.rmtree(tmp_path / "runs" / "addition_retuning_small_tiny_seed0")
    run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.lengths=1-3")
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["Re-Tuning"]


def test_a_rerun_with_other_settings_redoes_or_refuses_what_they_change_and_keeps_the_rest(tmp_path):
    run_reproduce(tmp_path, "methods=[retuning]")
    model = tmp_path / "runs" / "addition_retuning_small_tiny_seed0" / "final" / "model.safetensors"
    results = tmp_path / "results" / "addition" / "retuning" / "results.json"
    trained_at = model.stat().st_mtime_ns

    # Another seed: its own run directory and results folder; seed 0's results stay.
    seed0_results = results.read_bytes()
    again = run_reproduce(tmp_path, "methods=[retuning]", "seed=1")
    assert "train.py" in again.stderr + again.stdout
    assert (tmp_path / "runs" / "addition_retuning_small_tiny_seed1" / "final" / "model.safetensors").exists()
    seed1 = tmp_path / "results" / "addition_small_tiny_seed1"
    settings = json.loads((seed1 / "retuning" / "results.json").read_text())["settings"]
    assert settings["seed"] == 1 and settings["run_dir"].endswith("_seed1")
    assert "| Re-Tuning |" in (seed1 / "summary.md").read_text()
    assert results.read_bytes() == seed0_results

    # Back to seed 0 with more problems per length: evaluated again, not trained again.
    again = run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.eval_samples=3")
    assert "train.py" not in again.stderr + again.stdout
    evaluated = json.loads(results.read_text())
    assert evaluated["settings"]["run_dir"].endswith("_seed0")
    assert all(row["problems"] == 3 for row in evaluated["lengths"].values())

    # Other training lengths change the data: the seed-0 run directory holds a training on the
    # old data, so the run stops with an error that names it and the data, and keeps the model.
    refused = run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.lengths=1-3", check=False)
    assert refused.returncode != 0
    assert "addition_retuning_small_tiny_seed0 holds a training with other settings (data: " in refused.stderr
    assert model.stat().st_mtime_ns == trained_at

    # Results that do not say they are this evaluation (left by another run, or drawn by an
    # older way of sampling the problems) are redone.
    for key, other in [("samples", 5), ("sampling", None)]:
        evaluated["settings"][key] = other
        results.write_text(json.dumps(evaluated))
        run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.eval_samples=3")
        evaluated = json.loads(results.read_text())
        assert evaluated["settings"]["samples"] == 3 and evaluated["settings"]["sampling"] is not None

    # An edit of config/config.yaml or config/model/tiny.yaml since the training (here the other
    # way round: the run's saved config changed) is refused too, naming the setting.
    saved = tmp_path / "runs" / "addition_retuning_small_tiny_seed0" / "config.yaml"
    saved.write_text(saved.read_text().replace("\nlr: 0.001\n", "\nlr: 0.002\n"))
    refused = run_reproduce(tmp_path, "methods=[retuning]", "tasks.addition.small.eval_samples=3", check=False)
    assert refused.returncode != 0 and "(lr=0.002, not 0.001)" in refused.stderr
    assert model.stat().st_mtime_ns == trained_at


def test_a_killed_reproduction_stops_its_children_and_a_rerun_finishes_it(tmp_path):
    import signal
    import time
    longer = [arg.replace("'n_examples=64'", "'n_examples=20000'").replace("'eval_every=32'", "'eval_every=512'")
              for arg in TOY]
    args = [sys.executable, os.path.join(REPO, "reproduce.py"), f"data_dir={tmp_path}/data",
            f"runs_dir={tmp_path}/runs", f"results_dir={tmp_path}/results", *longer, "methods=[retuning]"]
    run_dir = tmp_path / "runs" / "addition_retuning_small_tiny_seed0"
    parent = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = lambda: [p for p in run_dir.glob("step-*") if re.fullmatch(r"step-\d+", p.name)]  # noqa: E731
    deadline = time.time() + 120
    while not checkpoints() and time.time() < deadline:  # training, a checkpoint written (not staged)
        time.sleep(0.2)
    assert checkpoints(), "no checkpoint within 120 s"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    time.sleep(1)

    def command_line(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                return handle.read()
        except OSError:  # the process ended after it was listed (other jobs run on the machine)
            return b""

    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and str(tmp_path).encode() in command_line(pid)]
    assert children == [] and not (run_dir / "final").exists()
    stretch = json.loads((run_dir / "reproduce_stats.json").read_text())["train_wall_s"]
    assert stretch > 0

    finished = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resume={run_dir}" in finished.stdout + finished.stderr
    total = json.loads((run_dir / "reproduce_stats.json").read_text())["train_wall_s"]
    assert total > stretch  # the training time covers both stretches
    row = next(line for line in (tmp_path / "results" / "addition" / "summary.md").read_text().splitlines()
               if line.startswith("| Re-Tuning"))
    assert row.split("|")[8].strip() == f"{total / 60:.1f} min"


def test_every_training_override_in_the_reproduce_config_lands_in_the_training_config():
    # A misspelt key here would fail only deep inside a reproduction, as a child's Hydra error.
    tasks = OmegaConf.load(os.path.join(REPO, "config", "reproduce", "config.yaml")).tasks
    checked = 0
    for task, presets in tasks.items():
        for preset, settings in presets.items():
            for group, overrides in settings.train.items():
                if not overrides:
                    continue
                cfg = compose_config(["model=tiny", *[f"{key}={override_value(value)}" for key, value in overrides.items()]])
                for key, value in overrides.items():
                    assert OmegaConf.select(cfg, key) == value, (task, preset, group, key)
                    checked += 1
    assert checked >= 4  # parity's stride, parity's and dp's initialisation, addition Re-Tuning's gaps


def test_config_values_reach_train_py_as_hydra_overrides_that_parse_back():
    gaps = OmegaConf.create({"gaps": [{"after": "+", "max": 16}, {"inside": "0123456789", "before": "\n", "max": 4}]}).gaps
    assert override_value(gaps) == '[{after:"+",max:16},{inside:"0123456789",before:"\n",max:4}]'  # a real newline: Hydra reads no \\n escape
    cfg = compose_config([f"position_gaps={override_value(gaps)}", f"lr={override_value(0.002)}"])
    assert OmegaConf.to_container(cfg.position_gaps) == OmegaConf.to_container(gaps) and cfg.lr == 0.002


def test_data_of_another_seed_or_generator_version_is_made_anew(tmp_path):
    from reproduce import make_data
    cfg = OmegaConf.create({"data_dir": str(tmp_path), "seed": 0})
    settings = OmegaConf.create({"lengths": "1-2"})
    train_path = make_data(cfg, "parity", "baseline", "small", settings)
    meta_path = tmp_path / "parity_baseline_small_meta.json"
    first = json.loads(meta_path.read_text())
    assert make_data(cfg, "parity", "baseline", "small", settings) == train_path
    assert json.loads(meta_path.read_text()) == first  # the same settings: kept

    meta_path.write_text(json.dumps({**first, "generator_version": first["generator_version"] - 1}))
    make_data(cfg, "parity", "baseline", "small", settings)
    assert json.loads(meta_path.read_text()) == first  # an older generator's data: made anew

    meta_path.write_text(json.dumps({**first, "seed": 3}))
    make_data(cfg, "parity", "baseline", "small", settings)
    assert json.loads(meta_path.read_text()) == first  # another seed's data in seed 0's place: anew

    # Another seed's data go to a folder of their own: seed 0's stay as they are.
    seed1_path = make_data(OmegaConf.create({"data_dir": str(tmp_path), "seed": 1}), "parity", "baseline",
                           "small", settings)
    assert seed1_path == str(tmp_path / "seed1" / "parity_baseline_small_train.json")
    assert json.loads((tmp_path / "seed1" / "parity_baseline_small_meta.json").read_text())["seed"] == 1
    assert json.loads(meta_path.read_text()) == first


def test_a_token_budget_gives_batches_that_split_into_the_models_accumulation_steps():
    # model=llama7b accumulates 32 microbatches: a batch of 24 would stop train.py with an error
    # (found by `reproduce.py task=parity model=llama7b` with a token budget on a GPU).
    from reproduce import accumulation_steps, training_budget
    settings = OmegaConf.create({"train_steps": 3, "tokens_per_step": 2000})
    meta = {"tokens": {"mean": 83.5}}  # parity baseline, paper preset: 24 records per step unrounded
    assert accumulation_steps("llama7b", {}) == 32 and accumulation_steps("tiny", {}) == 1
    assert accumulation_steps("llama7b", {"gradient_accumulation_steps": "4"}) == 4
    assert training_budget(settings, meta, 32) == {"batch_size": 32, "n_examples": 96}
    assert training_budget(settings, meta, 4) == {"batch_size": 24, "n_examples": 72}
    assert training_budget(settings, meta, 1) == {"batch_size": 24, "n_examples": 72}  # the tiny model's, as before
    assert training_budget(settings, {"tokens": {"mean": 400.0}}, 32) == {"batch_size": 32, "n_examples": 96}


def test_jobs_auto_trains_every_method_at_once_on_a_cpu_and_one_at_a_time_on_a_gpu():
    # Three one-thread trainings on two cores compute as much together as two (docs/tiny_model.md),
    # so the tiny model's methods all start at once, whatever the core count; a hub model's share a GPU.
    from reproduce import parallel_jobs
    methods = ["baseline", "scratchpad", "retuning"]

    def jobs(**settings):
        return parallel_jobs(OmegaConf.create({"jobs": "auto", "model": "tiny", "methods": methods, **settings}))
    assert jobs() == 3 and jobs(methods=["retuning"]) == 1
    assert jobs(model="llama7b") == 1 and jobs(model="tinyllama") == 1
    assert jobs(jobs=2) == 2 and jobs(jobs=1) == 1


def test_summary_shows_peak_gpu_memory_of_runs_trained_on_a_gpu(tmp_path):
    from reproduce import STATS_FILE, summary_markdown, training_cost
    results = {"lengths": {"1": {"problems": 2, "correct": 1}}, "settings": {"train_lengths": [1]}}
    for name, gpu in [("cpu_run", None), ("gpu_run", [27.04, 28.14])]:
        run = tmp_path / name
        (run / "final").mkdir(parents=True)
        (run / "final" / "trainer_state.json").write_text(json.dumps({"records_seen": 96}))
        (run / "data_meta.json").write_text(json.dumps([{"tokens": {"mean": 83.5}}]))
        (run / STATS_FILE).write_text(json.dumps({"train_wall_s": 60, "peak_rss_mb": 39445}))
        rows = [{"step": i, "records": 32 * i, **({"cuda_max_memory_gb": g} if gpu else {})} for i, g in enumerate(gpu or [0, 0])]
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    costs = {"baseline": training_cost(str(tmp_path / "cpu_run")), "retuning": training_cost(str(tmp_path / "gpu_run"))}
    summary = summary_markdown("parity", "paper", "llama7b", {"baseline": results, "retuning": results}, costs)
    assert "| Baseline | 50.0% | - | - | 96 | 8,016 | 83.5 | 1.0 min | 39,445 MB |" in summary
    assert "| Re-Tuning | 50.0% | - | - | 96 | 8,016 | 83.5 | 1.0 min | 28.1 GiB GPU, 39,445 MB |" in summary


def test_unknown_task_model_or_method_stops_with_one_line_before_any_work(tmp_path):
    # Evaluation settings too: they are read only after the trainings, minutes later.
    for override, message in [("task=foo", "error: task=foo: unknown task 'foo'; known: addition, dp, parity"),
                              ("model=nosuch", "error: model=nosuch: no config/model/nosuch.yaml; known: llama13b"),
                              ("methods=[foo,baseline]", "error: methods: unknown foo; known: baseline, scratchpad, retuning"),
                              ("methods=[]", "error: methods is empty"),
                              ("jobs=0", "error: jobs must be auto or a whole number >= 1, got 0"),
                              ("seed=01", "error: seed must be a whole number, got '01'"),
                              ("eval.dtype=int8", "error: eval.dtype must be one of auto, float32"),
                              ("tasks.addition.small.eval_lengths=0-3", "error: tasks.addition.small.eval_lengths=0-3: "),
                              ("tasks.addition.small.eval_samples=0", "error: tasks.addition.small.eval_samples must be")]:
        done = subprocess.run([sys.executable, os.path.join(REPO, "reproduce.py"), override, f"data_dir={tmp_path}/data"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-500:]
        assert "Traceback" not in done.stderr and not (tmp_path / "data").exists()
