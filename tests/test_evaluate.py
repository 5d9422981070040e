"""The evaluation scripts: run directories and checkpoints (full model and LoRA adapter), run
metadata, flags, results.json / accuracy.png, --show-trace, plot.py, and clear one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from evaluation import cli, plot
from evaluation.backends import HFBackend
from evaluation.engine import LimitRules, run_engine, sample_problems
from evaluation.quick_model import cached_quick_model
from modeling import FROM_SCRATCH_BASE_PATH, add_lora, build_char_tokenizer, build_tiny_model, load_checkpoint
from tasks import get_task, parse_lengths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_meta(run_dir, entries):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "data_meta.json"), "w") as handle:
        json.dump(entries, handle)
    with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
        handle.write("exp_name: test\n")


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """runs/par_rt with final/ (the briefly trained full model) and step-10/ (a LoRA adapter on a
    random base saved in base_model/, its weights perturbed so that the adapter matters)."""
    run = tmp_path_factory.mktemp("runs") / "par_rt"
    model, tokenizer = cached_quick_model("parity", "retuning", (1, 2, 3, 4), steps=300)
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    write_meta(run, [{"path": "data/parity_retuning_small_train.json", "task": "parity",
                      "method": "retuning", "preset": "small", "seed": 0, "train_lengths": [1, 2, 3, 4]}])

    tokenizer = build_char_tokenizer()
    base = build_tiny_model(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=512,
                                 initializer_range=0.3), tokenizer, seed=1)
    base.save_pretrained(run / "base_model")
    tokenizer.save_pretrained(run / "base_model")
    lora = add_lora(base, {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}, "all-linear",
                    base_name_or_path=FROM_SCRATCH_BASE_PATH)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    lora.save_pretrained(run / "step-10")
    tokenizer.save_pretrained(run / "step-10")
    return run, lora.eval(), tokenizer


# --- small parsers and metadata -------------------------------------------------------------
def test_parse_lengths():
    assert parse_lengths("2-5,8,10-11") == [2, 3, 4, 5, 8, 10, 11]
    assert parse_lengths("7") == [7] and parse_lengths([3, 2]) == [3, 2]
    for bad in ("5-2", "a", "2-", "0-3", ""):
        with pytest.raises(ValueError, match="--lengths"):
            parse_lengths(bad)


def test_resolve_checkpoint(parity_run, tmp_path):
    run, _, _ = parity_run
    assert cli.resolve_checkpoint(run) == (run / "final", run, "par_rt")
    checkpoint, run_dir, name = cli.resolve_checkpoint(run / "step-10")
    assert (checkpoint, run_dir.resolve(), name) == (run / "step-10", run.resolve(), "par_rt_step-10")
    unfinished = tmp_path / "unfinished"
    (unfinished / "step-20").mkdir(parents=True)
    (unfinished / "step-20" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no final/ checkpoint; pass one of .*step-20"):
        cli.resolve_checkpoint(unfinished)
    with pytest.raises(SystemExit, match="no such directory"):
        cli.resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(SystemExit, match="neither a run directory"):
        cli.resolve_checkpoint(tmp_path)


def test_run_metadata(tmp_path):
    write_meta(tmp_path, [{"task": "addition", "method": "retuning", "train_lengths": [1, 2, 3]},
                          {"task": "addition", "method": "retuning", "train_lengths": [3, 9]}])
    assert cli.read_run_metadata(tmp_path, "addition") == {"methods": ["retuning"],
                                                           "train_lengths": [1, 2, 3, 9]}
    with pytest.raises(SystemExit, match="data_meta.json: the run was trained on task addition, not parity"):
        cli.read_run_metadata(tmp_path, "parity")
    # A dataset of the user's own (no task named) is no evidence against the task evaluated.
    write_meta(tmp_path, [{"path": "mine.json"}])
    assert cli.read_run_metadata(tmp_path, "parity") == {"methods": [], "train_lengths": []}
    write_meta(tmp_path, [{"path": "mine.json"}, {"task": "dp", "method": "baseline"}])
    with pytest.raises(SystemExit, match="trained on task dp, not parity"):
        cli.read_run_metadata(tmp_path, "parity")
    (tmp_path / "data_meta.json").write_text("{not json")
    with pytest.raises(SystemExit, match="data_meta.json: not valid JSON"):
        cli.read_run_metadata(tmp_path, "addition")
    assert cli.read_run_metadata(None, "addition") == {}


# --- end to end -----------------------------------------------------------------------------
def test_evaluate_a_run_directory(parity_run, tmp_path, capsys):
    run, _, _ = parity_run
    out = tmp_path / "results"
    results = cli.main("parity", ["--checkpoint", str(run), "--lengths", "2-4,6", "--samples", "3",
                                  "--out", str(out), "--quiet", "--show-trace", "4"])
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (out / "accuracy.png").read_bytes().startswith(PNG_MAGIC)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    # Method and trained lengths came from data_meta.json; the rest from flags and the YAML.
    assert saved["task"] == "parity" and saved["method"] == "retuning"
    assert saved["settings"]["train_lengths"] == [1, 2, 3, 4]
    assert saved["settings"]["lengths"] == [2, 3, 4, 6] and saved["settings"]["samples"] == 3
    assert saved["settings"]["limits"]["depth_per_length"] == 2  # config/evaluation/parity.yaml
    assert list(saved["lengths"]) == ["2", "3", "4", "6"]
    for row in saved["lengths"].values():
        assert set(row) >= {"problems", "correct", "accuracy", "failures", "mean_calls",
                            "mean_generated_tokens", "wall_time_s"}
        assert row["problems"] == 3 and row["accuracy"] == row["correct"] / 3
    problem = saved["problems"][4]
    assert set(problem) >= {"problem", "expected", "predicted", "correct", "failure", "trace"}
    assert problem["trace"][0]["context"] == "What is the parity of " + \
        str(problem["problem"]) + "?\nSolution: "
    # The model learned the protocol (its parity is at chance after 300 steps): every problem
    # made its calls and ended in a parsed answer.
    assert saved["summary"]["failures"] == {} and saved["summary"]["mean_calls"] >= 1
    assert saved["summary"]["prompt_tokens_computed"] < saved["summary"]["prompt_tokens"]
    assert f"#4 length {problem['length']}: expected {problem['expected']}" in printed
    assert "[0] What is the parity of" in printed and "  [1] " in printed
    assert "parity retuning:" in printed  # the summary table
    # The same seed draws the same problems and, greedy, the same answers.
    again = cli.evaluate_checkpoint("parity", str(run), lengths="2-4,6", samples=3,
                                    out=str(tmp_path / "again"), progress=False)
    strip = lambda r: [{k: v for k, v in p.items()} for p in r["problems"]]  # noqa: E731
    assert strip(again) == strip(saved)


def test_evaluate_a_lora_step_checkpoint(parity_run, tmp_path):
    """A step-<n> LoRA adapter loads through PeftModel onto its saved base and answers as the
    in-memory adapter model does."""
    run, lora, tokenizer = parity_run
    out = tmp_path / "lora"
    results = cli.main("parity", ["--checkpoint", str(run / "step-10"), "--lengths", "2,3",
                                  "--samples", "2", "--max-new-tokens", "12", "--out", str(out),
                                  "--quiet", "--batch-size", "3"])
    task = get_task("parity")
    problems = sample_problems(task, [2, 3], 2, seed=0)
    rules = LimitRules(new_tokens_fixed=12)
    backend = HFBackend(lora, tokenizer)
    direct = run_engine(backend, task, "retuning", problems,
                        lambda p: rules.for_problem(task, "retuning", p, backend), progress=False)
    assert [p["trace"] for p in results["problems"]] == \
           [[{"depth": s.depth, "context": s.context, "completion": s.completion} for s in r.trace]
            for r in direct]
    assert results["settings"]["checkpoint"].endswith("step-10")
    assert results["settings"]["train_lengths"] == [1, 2, 3, 4]


def traces_of(problems):
    return [[(step["depth"], step["context"], step["completion"]) for step in problem["trace"]] for problem in problems]


def test_temperature_and_seed_reach_the_models_backend(parity_run, tmp_path):
    """``--temperature 1 --seed 1`` decodes as an HFBackend sampling with seed 1 does, on the
    problems seed 1 draws: the same answers as that backend, which are not the greedy ones."""
    run, _, _ = parity_run
    flags = ["--checkpoint", str(run), "--lengths", "3,6", "--samples", "4", "--batch-size", "8",
             "--max-new-tokens", "20", "--quiet"]
    results = cli.main("parity", flags + ["--temperature", "1", "--seed", "1", "--out", str(tmp_path / "t1")])
    assert results["settings"]["temperature"] == 1.0 and results["settings"]["seed"] == 1

    task = get_task("parity")
    model, tokenizer = load_checkpoint(str(run / "final"))
    problems = sample_problems(task, [3, 6], 4, seed=1)
    rules = LimitRules(**{**cli.load_eval_config("parity")["limits"], "new_tokens_fixed": 20})

    def solve(temperature):
        backend = HFBackend(model.eval(), tokenizer, batch_size=8, temperature=temperature, seed=1)
        solved = run_engine(backend, task, "retuning", problems,
                            lambda p: rules.for_problem(task, "retuning", p, backend), progress=False)
        return [[(s.depth, s.context, s.completion) for s in r.trace] for r in solved]

    sampled = solve(1.0)
    assert traces_of(results["problems"]) == sampled
    assert sampled != solve(0.0)  # so a command that decoded greedily would have been told apart


def test_no_kv_reuse_encodes_every_prompt_whole_and_writes_the_same_text(parity_run, tmp_path):
    run, _, _ = parity_run
    flags = ["--checkpoint", str(run), "--lengths", "3,5", "--samples", "2", "--quiet"]
    reused = cli.main("parity", flags + ["--out", str(tmp_path / "reused")])
    whole = cli.main("parity", flags + ["--no-kv-reuse", "--out", str(tmp_path / "whole")])
    assert traces_of(whole["problems"]) == traces_of(reused["problems"])
    assert whole["settings"]["kv_reuse"] is False and reused["settings"]["kv_reuse"] is True
    assert whole["summary"]["prompt_tokens_computed"] == whole["summary"]["prompt_tokens"]
    assert reused["summary"]["prompt_tokens_computed"] < reused["summary"]["prompt_tokens"]


def test_an_interrupted_write_leaves_the_previous_results_whole(tmp_path, monkeypatch):
    """results.json is written under a temporary name and renamed: a write that stops half way
    (Ctrl-C, a full disk) leaves the results that were there, and no temporary file."""
    out = tmp_path / "results"
    flags = ["--oracle", "--method", "baseline", "--samples", "1", "--out", str(out), "--quiet"]
    cli.main("parity", flags + ["--lengths", "2"])
    before = (out / "results.json").read_text()

    def stop(*args):  # after the text is written, before it is renamed into place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main("parity", flags + ["--lengths", "3"])
    assert (out / "results.json").read_text() == before
    assert sorted(os.listdir(out)) == ["accuracy.png", "results.json"]


def test_script_runs_from_any_directory_with_the_oracle(tmp_path):
    out = tmp_path / "oracle"
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluation", "evaluate_addition.py"), "--oracle",
         "--method", "scratchpad", "--lengths", "2,30", "--samples", "2", "--out", str(out),
         "--quiet", "--show-trace", "3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["accuracy"] == 1.0 and saved["lengths"]["30"]["problems"] == 2
    assert "#3 length 30" in completed.stdout and "Carry" in completed.stdout


def test_show_trace_from_saved_results(tmp_path, capsys):
    out = tmp_path / "dp"
    cli.main("dp", ["--oracle", "--method", "retuning", "--lengths", "3", "--samples", "1",
                    "--out", str(out), "--quiet"])
    capsys.readouterr()
    cli.main("dp", ["--show-trace", "0", "--out", str(out)])
    tree = capsys.readouterr().out.splitlines()
    assert tree[0].startswith("#0 length 3:") and tree[0].endswith("(correct)")
    assert tree[1].startswith("[0] Compute the maximum sum of nonadjacent subsequences of [")
    assert any(line.startswith("      [3] Create dp array [") for line in tree)
    with pytest.raises(SystemExit, match="--show-trace 5: the results hold problems 0..0"):
        cli.main("dp", ["--show-trace", "5", "--out", str(out)])


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "2-x", "--oracle", "--method", "baseline"], "--lengths: cannot read '2-x'"),
    (["--oracle"], "--method is needed"),
    (["--samples", "0", "--oracle", "--method", "baseline"], "--samples must be >= 1"),
    (["--max-depth", "0", "--oracle", "--method", "retuning"], "--max-depth must be >= 1, got 0"),
    (["--max-calls", "-5", "--oracle", "--method", "retuning"], "--max-calls must be >= 1, got -5"),
    (["--batch-size", "0", "--oracle", "--method", "baseline"], "--batch-size must be >= 1, got 0"),
    (["--temperature", "-1", "--oracle", "--method", "baseline"], "--temperature must be 0"),
    (["--device", "tpu", "--oracle", "--method", "baseline"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    ([], "--checkpoint is required"),
])
def test_bad_flags_give_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message) as error:
        cli.main("parity", argv + ["--out", str(tmp_path / "x"), "--quiet"])
    assert "\n" not in str(error.value)
    assert not (tmp_path / "x").exists()


def test_a_run_of_another_task_is_refused(parity_run, tmp_path):
    run, _, _ = parity_run
    with pytest.raises(SystemExit, match="trained on task parity, not addition"):
        cli.main("addition", ["--checkpoint", str(run), "--out", str(tmp_path / "x"), "--quiet"])


def test_plot_overlays_several_results(tmp_path, capsys):
    dirs = []
    for method in ("baseline", "retuning"):
        out = tmp_path / method
        cli.main("parity", ["--oracle", "--method", method, "--lengths", "2-5", "--samples", "1",
                            "--out", str(out), "--quiet", "--train-lengths", "1-3"])
        dirs.append(str(out))
    image = tmp_path / "figs" / "parity.png"
    plot.main(dirs + ["-o", str(image)])
    assert image.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit):
        plot.main(dirs + ["-o", str(image), "--labels", "only-one"])
    with pytest.raises(SystemExit, match="no results.json there"):
        plot.main([str(tmp_path / "nothing"), "-o", str(image)])

    # An image that cannot be written is a one-line error; the figure already there stays whole.
    drawn = image.read_bytes()
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    for bad in (tmp_path / "a_file" / "parity.png", image.with_suffix(".nosuchformat")):
        with pytest.raises(SystemExit):
            plot.main(dirs + ["-o", str(bad)])
        assert f"-o {bad}: cannot write the image" in capsys.readouterr().err
    assert image.read_bytes() == drawn and sorted(os.listdir(image.parent)) == ["parity.png"]


def test_the_figure_draws_each_accuracy_at_its_length_and_shades_the_trained_lengths(tmp_path, monkeypatch):
    """One line per results, labelled by method: accuracy in percent at each length, lengths in
    numeric order ("10" after "3"); the trained span shaded once, from 0.5 below to 0.5 above."""
    close, figures = plot.plt.close, []
    monkeypatch.setattr(plot.plt, "close", figures.append)  # keep the figure to read it back

    def results(method, accuracy):
        return {"task": "parity", "method": method, "settings": {"train_lengths": [1, 2, 3]},
                "lengths": {str(n): {"accuracy": a} for n, a in accuracy.items()}}

    plot.plot_accuracy([results("baseline", {10: 0.0, 2: 1.0, 3: 0.5}),
                        results("retuning", {2: 1.0, 3: 1.0, 10: 0.95})], tmp_path / "figure.png")
    (figure,) = figures
    try:
        (axes,) = figure.axes
        lines = axes.get_lines()
        assert [line.get_label() for line in lines] == ["Baseline", "Re-Tuning"]
        assert [list(line.get_xdata()) for line in lines] == [[2, 3, 10], [2, 3, 10]]
        assert [list(line.get_ydata()) for line in lines] == [[100.0, 50.0, 0.0], [100.0, 100.0, 95.0]]
        (span,) = axes.patches
        assert (span.get_x(), span.get_x() + span.get_width()) == (0.5, 3.5)
        assert span.get_label() == "trained lengths"
        assert axes.get_title() == "parity: accuracy by problem length"
    finally:
        close(figure)
    assert (tmp_path / "figure.png").read_bytes().startswith(PNG_MAGIC)


def test_pooled_seeds_draw_one_line_per_method_with_their_range(tmp_path, monkeypatch):
    """--pool: the runs of one method (three seeds) become one line at the pooled accuracy, the
    lowest and highest seed shaded around it, labelled with how many runs it pools."""
    close, figures = plot.plt.close, []
    monkeypatch.setattr(plot.plt, "close", figures.append)
    paths = []
    for seed, (method, correct) in enumerate([("retuning", [20, 19]), ("retuning", [20, 10]),
                                              ("baseline", [5, 0]), ("retuning", [17, 16])]):
        rows = {str(n): {"correct": c, "problems": 20, "accuracy": c / 20} for n, c in zip((7, 12), correct)}
        path = tmp_path / f"{method}_seed{seed}.json"
        path.write_text(json.dumps({"task": "addition", "method": method, "lengths": rows,
                                    "settings": {"train_lengths": [1, 6]}}))
        paths.append(str(path))
    plot.main(["--pool", *paths, "-o", str(tmp_path / "seeds.png")])
    (figure,) = figures
    try:
        (axes,) = figure.axes
        lines = axes.get_lines()
        assert [line.get_label() for line in lines] == ["Re-Tuning (3 runs)", "Baseline"]
        assert list(lines[0].get_ydata()) == [pytest.approx(100 * 57 / 60), pytest.approx(100 * 45 / 60)]
        assert list(lines[1].get_ydata()) == [25.0, 0.0]
        (band,) = axes.collections  # the single baseline run gets none
        corners = band.get_paths()[0].vertices
        assert {(x, y) for x, y in corners} >= {(7, 85.0), (7, 100.0), (12, 50.0), (12, 95.0)}
    finally:
        close(figure)
    with pytest.raises(SystemExit):  # a label per line drawn, not per file given
        plot.main(["--pool", *paths, "-o", str(tmp_path / "x.png"), "--labels", "a", "b", "c", "d"])


def test_a_warning_where_the_limits_stop_even_the_oracle(tmp_path, capsys):
    # SPEC's fixed depth of 35 for DP: no model can solve a list of 36 items under it.
    cli.main("dp", ["--oracle", "--method", "retuning", "--lengths", "35", "--samples", "1",
                    "--out", str(tmp_path / "a"), "--quiet"])
    assert "warning" not in capsys.readouterr().err
    cli.main("dp", ["--oracle", "--method", "retuning", "--lengths", "34-36", "--samples", "1",
                    "--out", str(tmp_path / "b"), "--quiet"])
    assert "warning: at length 36 the limits stop even the task's oracle (max_depth)" in capsys.readouterr().err
    cli.main("dp", ["--oracle", "--method", "retuning", "--lengths", "36", "--samples", "1", "--max-depth", "40",
                    "--out", str(tmp_path / "c"), "--quiet"])
    assert "warning" not in capsys.readouterr().err
