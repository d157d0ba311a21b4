"""`sacpo generate` / `sacpo evaluate` end to end on tiny models, with caching, and the score-model configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_prompts import write_eval_prompts

from sacpo_lightning.evaluation import evaluate as evaluate_module
from sacpo_lightning.evaluation import generation as gen
from sacpo_lightning.evaluation import score_models
from sacpo_lightning.evaluation.cli import evaluate_main, generate_main
from sacpo_lightning.evaluation.evaluate import default_model_name, parse_named_models
from sacpo_lightning.evaluation.settings import EvaluationSettings
from sacpo_lightning.models.classifier import load_sequence_classifier
from sacpo_lightning.models.tiny import save_tiny_model
from sacpo_lightning.modules import ScoreModelModule

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "eval").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("evalcli")
    other = save_tiny_model(root / "step2", seed=1)
    scorers = {}
    for kind, seed in (("reward", 0), ("cost", 1)):
        torch.manual_seed(seed)
        from sacpo_lightning.models import load_tokenizer

        tokenizer = load_tokenizer(tiny_model_dir)
        model = load_sequence_classifier(tiny_model_dir, num_labels=1,
                                                      pad_token_id=tokenizer.pad_token_id)
        scorers[kind] = root / kind
        model.save_pretrained(scorers[kind])
        tokenizer.save_pretrained(scorers[kind])
    safety, helpful = write_eval_prompts(root)
    return {"root": root, "sft": tiny_model_dir, "step2": str(other), "safety": str(safety),
            "helpful": str(helpful), **{k: str(v) for k, v in scorers.items()}}


def test_generate_main(setup_dirs, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    assert generate_main(["--model", setup_dirs["sft"], "--prompts", setup_dirs["safety"], "--output", str(out),
                          "--max_new_tokens", "3", "--device", "cpu", "--name", "sft"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["model"] == "sft" and rows[0]["category"] == "Physical Harm"
    with pytest.raises(SystemExit):
        generate_main(["--model", "x", "--prompts", "p", "--output", "o", "--top_p", "0"])


def test_model_names():
    assert default_model_name("outputs/step1/export/") == "export"
    assert default_model_name("mix:a/s1+b/s2@0.25") == "s1+s2@0.25"
    assert parse_named_models(["sft=a/b", "mix:x+y@0.5"]) == {"sft": "a/b", "x+y@0.5": "mix:x+y@0.5"}
    with pytest.raises(ValueError, match="named"):
        parse_named_models(["a/m", "b/m"])


def test_evaluate_main_and_cache(setup_dirs, monkeypatch, capsys):
    d = setup_dirs
    out = d["root"] / "report"
    mix = f"mix:{d['sft']}+{d['step2']}@0.5"
    argv = ["--models", f"sft={d['sft']}", f"step2={d['step2']}", mix, "--baseline", "sft",
            "--judges", "reward_cost", "implicit", "--output", str(out),
            "--prompts_safety", d["safety"], "--prompts_helpful", d["helpful"],
            "--reward_model", d["reward"], "--cost_model", d["cost"], "--max_new_tokens", "4", "--device", "cpu",
            "--bootstrap_samples", "50", "--elo_shuffles", "5",
            "--implicit_safety_pairs", "../shared/data/pku_saferlhf/safety_pairs.fixtures.jsonl",
            "--implicit_split", "all", "--implicit_max_pairs", "4", "--implicit_max_length", "96",
            "--implicit_max_prompt_length", "48"]
    assert evaluate_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    assert list(models) == ["sft", "step2", "tiny-llama+step2@0.5"]
    assert models["sft"]["helpfulness"]["win_rate"] == 0.5 and models["sft"]["harmlessness"]["ties"] == 3
    assert set(models["step2"]["harmlessness_by_category"]) == {"Physical Harm", "Insult", "Crime"}
    assert models["step2"]["scores"]["safety"]["unsafe_fraction"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "mean_reward" in models["step2"]["scores"]["helpful"]
    assert set(report["elo"]) == {"helpfulness", "harmlessness"}
    assert sum(r["mean"] for r in report["elo"]["helpfulness"].values()) == pytest.approx(3000.0)
    assert models["step2"]["implicit"]["safety"]["num_pairs"] == 4 and "implicit" not in models["sft"]
    for name in ("report.md", "pareto.png"):
        assert (out / name).is_file()
    assert (out / "generations" / "safety" / "step2.jsonl").is_file()
    # score models without score_model.json (as from the Hub): reliability unknown, so their numbers are flagged
    assert report["judge_reliability"]["reward"]["better_than_chance"] is None
    assert "## Flagged: numbers from judges not better than chance" in (out / "report.md").read_text()

    # A rerun reuses generations and scores: no model is loaded for either.
    def fail(*args, **kwargs):
        raise AssertionError("should be cached")

    monkeypatch.setattr(gen, "load_generation_model", fail)
    monkeypatch.setattr(score_models.ScoreModel, "from_pretrained", fail)
    settings = EvaluationSettings(
        prompts_safety=d["safety"], prompts_helpful=d["helpful"], reward_model=d["reward"], cost_model=d["cost"],
        generation=gen.GenerationSettings(max_new_tokens=4, device="cpu"), bootstrap_samples=50, elo_shuffles=5)
    report_again = evaluate_module.evaluate_models({"sft": d["sft"], "step2": d["step2"]}, "sft", out, settings)
    assert report_again["models"]["step2"]["harmlessness"] == models["step2"]["harmlessness"]


def test_evaluate_argument_errors(setup_dirs, tmp_path, capsys):
    base = ["--models", "a", "--baseline", "a", "--output", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="the llm judge needs a backend: judge_url"):
        evaluate_main([*base, "--judges", "llm"])
    with pytest.raises(SystemExit):
        evaluate_main([*base, "--judges", "llm", "--judge_url", "http://localhost:1"])
    assert "judge_url needs judge_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([*base, "--judges", "reward_cost"])
    assert "the reward_cost judge needs reward_model and/or cost_model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reward_model"):
        EvaluationSettings(prompts_safety=setup_dirs["safety"])
    with pytest.raises(SystemExit):
        evaluate_main([*base, "--judges", "implicit", "--bootstrap_samples", "0",
                       "--implicit_safety_pairs", "pairs.jsonl"])
    assert "bootstrap_samples must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_configs_parse(config, monkeypatch):
    from sacpo_lightning.cli import lightning_cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    first = config.read_text().splitlines()[:4]
    assert first[0].startswith("# ") and any(f"--config configs/eval/{config.name}" in line for line in first)
    cli = lightning_cli(["--config", str(config)], run=False)
    assert isinstance(cli.model, ScoreModelModule)
    assert cli.datamodule.hparams.kind == "pairs"
    assert cli.datamodule.hparams.tokenizer == cli.model.policy_settings.name_or_path


def test_evaluate_with_llm_judge(setup_dirs, tmp_path):
    from sacpo_lightning.evaluation.judge import CallableBackend, PairwiseJudge

    d = setup_dirs

    def prefer_first(messages):
        return "Assistant 1 is better.\n[[8]] [[3]]"

    judge = PairwiseJudge(CallableBackend(prefer_first, "first"), cache_path=tmp_path / "j.jsonl")
    settings = EvaluationSettings(
        prompts_safety=d["safety"], prompts_helpful=d["helpful"], reward_model=d["reward"],
        generation=gen.GenerationSettings(max_new_tokens=3, device="cpu"), judges=["reward_cost", "llm"],
        bootstrap_samples=20, elo_shuffles=3)
    report = evaluate_module.evaluate_models({"sft": d["sft"], "step2": d["step2"]}, "sft", tmp_path, settings,
                                             llm_judge_override=judge)
    step2 = report["models"]["step2"]
    # A judge that always prefers the first answer is cancelled out by judging both orders: every prompt ties,
    # unless the two models gave the same response (also a tie, without asking).
    assert step2["llm_judge"]["harmlessness"]["win_rate"] == 0.5
    assert step2["llm_judge"]["helpfulness"]["unparseable"] == 0
    assert "harmlessness" not in step2 and "helpfulness" in step2  # no cost model given
    assert {"llm_helpfulness", "llm_harmlessness", "helpfulness"} <= set(report["elo"])
    assert report["llm_judge"]["identity"] == "first"
    assert "LLM-judge win rates" in (tmp_path / "report.md").read_text()


def test_generate_main_sequence_level(setup_dirs, tmp_path):
    d = setup_dirs
    out = tmp_path / "mix.jsonl"
    mix = f"mix:{d['sft']}+{d['step2']}@0.3"
    common = ["--model", mix, "--prompts", d["safety"], "--output", str(out), "--max_new_tokens", "3",
              "--device", "cpu"]
    assert generate_main([*common, "--do_sample", "--sequence_level", "true", "--samples_per_prompt", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["samples"]) == 2 and 1 <= r["ess"] <= 2 for r in rows)
    assert all({"log_weight", "weight"} <= set(r["samples"][0]) and "resampled_index" in r for r in rows)
    for bad in (["--sequence_level", "true", "--samples_per_prompt", "2"],  # greedy
                ["--do_sample", "--sequence_level", "true", "--samples_per_prompt", "2", "--top_p", "0.9"],
                ["--do_sample", "--samples_per_prompt", "2"],
                ["--do_sample", "--sequence_level", "maybe"]):
        with pytest.raises(SystemExit):
            generate_main([*common, *bad])


def _snis(values, log_weights):
    weights = torch.tensor(log_weights, dtype=torch.float64).softmax(-1)
    return float((weights * torch.tensor(values, dtype=torch.float64)).sum())


def test_evaluate_sequence_level_scores(setup_dirs, tmp_path, monkeypatch, capsys):
    d = setup_dirs
    out = tmp_path / "seq"
    mix = f"mix:{d['sft']}+{d['step2']}@0.3"
    argv = ["--models", f"sft={d['sft']}", f"mix={mix}", "--baseline", "sft", "--judges", "reward_cost",
            "--output", str(out), "--prompts_safety", d["safety"], "--prompts_helpful", d["helpful"],
            "--reward_model", d["reward"], "--cost_model", d["cost"], "--max_new_tokens", "4", "--device", "cpu",
            "--bootstrap_samples", "20", "--elo_shuffles", "2",
            "--do_sample", "--sequence_level", "true", "--samples_per_prompt", "3"]
    assert evaluate_main(argv) == 0
    models = json.loads((out / "report.json").read_text())["models"]
    for set_name, kind in (("helpful", "reward"), ("safety", "cost")):
        rows = gen.read_generations(out / "generations" / set_name / "mix.jsonl")
        cached = json.loads((out / "scores" / set_name / f"mix.{kind}.json").read_text())
        log_w = [[s["log_weight"] for s in r["samples"]] for r in rows]
        summary = models["mix"]["scores"][set_name]
        expected = sum(_snis(v, w) for v, w in zip(cached["sample_scores"], log_w, strict=True)) / len(rows)
        assert summary[f"mean_{kind}"] == pytest.approx(expected, rel=1e-9)
        unweighted = sum(sum(v) / len(v) for v in cached["sample_scores"]) / len(rows)
        assert summary[f"unweighted_mean_{kind}"] == pytest.approx(unweighted, rel=1e-9)
        assert summary[f"mean_{kind}"] != pytest.approx(unweighted, rel=1e-9)  # the weights are not uniform
        assert summary["estimator"] == "snis" and summary["samples_per_prompt"] == 3
        assert 1.0 <= summary["ess_min"] <= summary["ess_mean"] < 3.0
        # Win rates use each prompt's resampled answer.
        assert cached["scores"] == [v[r["resampled_index"]] for v, r in
                                    zip(cached["sample_scores"], rows, strict=True)]
        assert models["sft"]["scores"][set_name]["ess_mean"] == pytest.approx(3.0)
    safety = models["mix"]["scores"]["safety"]
    cost_cache = json.loads((out / "scores" / "safety" / "mix.cost.json").read_text())
    rows = gen.read_generations(out / "generations" / "safety" / "mix.jsonl")
    unsafe = [_snis([float(c > 0) for c in v], [s["log_weight"] for s in r["samples"]])
              for v, r in zip(cost_cache["sample_scores"], rows, strict=True)]
    assert safety["unsafe_fraction"] == pytest.approx(sum(unsafe) / len(unsafe))

    # A rerun reuses the weighted generations and their per-sample scores.
    def fail(*args, **kwargs):
        raise AssertionError("should be cached")

    monkeypatch.setattr(gen, "load_generation_model", fail)
    monkeypatch.setattr(score_models.ScoreModel, "from_pretrained", fail)
    again = evaluate_module.evaluate_models({"sft": d["sft"], "mix": mix}, "sft", out, EvaluationSettings(
        prompts_safety=d["safety"], prompts_helpful=d["helpful"], reward_model=d["reward"], cost_model=d["cost"],
        generation=gen.GenerationSettings(max_new_tokens=4, device="cpu", do_sample=True, sequence_level=True,
                                          samples_per_prompt=3), bootstrap_samples=20, elo_shuffles=2))
    assert again["models"]["mix"]["scores"] == models["mix"]["scores"]


def test_implicit_set_naming_a_model_that_is_not_evaluated_fails_before_generation(setup_dirs, tmp_path,
                                                                                     monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("no model is loaded before the settings are checked")

    monkeypatch.setattr(gen, "load_generation_model", fail)
    settings = EvaluationSettings(judges=["implicit"], implicit={"s": {"train_files": ["p.jsonl"],
                                                                        "models": ["step2", "stepp2"]}})
    with pytest.raises(ValueError, match="implicit.s.models names stepp2, which are not evaluated; evaluated: sft, "
                                         "step2"):
        evaluate_module.evaluate_models({"sft": setup_dirs["sft"], "step2": setup_dirs["step2"]}, "sft",
                                        tmp_path / "o", settings)


def test_classifier_judge_carries_the_heldout_accuracy_its_model_recorded(tmp_path):
    import json

    from sacpo_lightning.evaluation.evaluate import describe_judge
    from sacpo_lightning.evaluation.safety_judges import ClassifierJudge, RefusalJudge

    folder = tmp_path / "cost"
    folder.mkdir()
    (folder / "score_model.json").write_text(json.dumps({"heldout": {"accuracy": 0.6, "pairs": 20}}))
    info = describe_judge(ClassifierJudge(str(folder)))
    assert info["reliability"]["better_than_chance"] is False and info["reliability"]["pairs"] == 20
    assert "reliability" not in describe_judge(ClassifierJudge(str(tmp_path)))  # nothing recorded: unknown
    assert "reliability" not in describe_judge(RefusalJudge())
