"""Task suites (issue 27 part 1): the built-in suites are what they say, the metrics are exact on
hand-made examples, a model's scores match a hand computation, bad suites are one line, exit 2."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scaling import tasks
from scaling.cli import main
from scaling.data.tokenize import get_tokenizer
from scaling.errors import UsageError
from scaling.train.tasks_eval import score_examples


def test_edit_distance_on_hand_made_pairs():
    assert tasks.edit_distance(list("kitten"), list("sitting")) == 3
    assert tasks.edit_distance([], [1, 2]) == 2 and tasks.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert tasks.edit_distance([1, 2, 3], [3, 2, 1]) == 2


def test_builtin_suites_are_deterministic_and_correct():
    a = tasks.builtin("arithmetic", n=300, seed=1)
    assert a == tasks.builtin("arithmetic", n=300, seed=1) and a != tasks.builtin("arithmetic", n=300, seed=2)
    for e in a:
        x, y = e.prompt[:-1].split("+")
        assert int(e.answer) == int(x) + int(y)
    assert max(len(e.answer) for e in a) == 4  # up to 999 + 999
    for e in tasks.builtin("copy", n=100):
        assert e.prompt == f"\ncopy {e.answer}: " and 3 <= len(e.answer) <= 8
    b = tasks.builtin("brackets", n=100)
    assert sum(e.answer == "yes" for e in b) == 50
    for e in b:
        assert tasks.is_balanced(e.prompt.split(" ")[0]) == (e.answer == "yes")
    assert tasks.is_balanced("([])[]") and not tasks.is_balanced("([)]") and not tasks.is_balanced("((")


class Bigram(nnx.Module):
    """Logits at each position depend only on that position's token: ``table[token]``."""

    def __init__(self, table_VxV):
        self.table = nnx.Param(jnp.asarray(table_VxV, jnp.float32))

    def __call__(self, x_BxL, train=False, mod_routing="causal"):
        return self.table[...][x_BxL], {}


def test_scores_match_a_hand_computation():
    tok = get_tokenizer("bytes")
    V = 256
    table = np.full((V, V), -5.0, np.float32)
    # after "=" the model prefers "4", after "4" it prefers "2": greedy continues "=" with "42"
    table[ord("="), ord("4")] = 3.0
    table[ord("4"), ord("2")] = 2.0
    model = Bigram(table)
    examples = [tasks.Example("6*7=", "42"), tasks.Example("5*9=", "45"), tasks.Example("1+1=", "2")]
    rows = score_examples(model, tok, examples, context=32)
    logp = jax.nn.log_softmax(jnp.asarray(table), axis=-1)
    lp42 = float(logp[ord("="), ord("4")] + logp[ord("4"), ord("2")])
    lp45 = float(logp[ord("="), ord("4")] + logp[ord("4"), ord("5")])
    assert rows[0]["answer_logprob"] == pytest.approx(lp42, abs=1e-5)
    assert rows[0]["answer_nll"] == pytest.approx(-lp42 / 2, abs=1e-5)
    assert (rows[0]["exact_match"], rows[0]["edit_distance"], rows[0]["greedy"]) == (1.0, 0.0, "42")
    assert rows[1]["answer_logprob"] == pytest.approx(lp45, abs=1e-5)
    assert (rows[1]["exact_match"], rows[1]["edit_distance"]) == (0.0, 0.5)  # "42" vs "45": one of two wrong
    assert (rows[2]["exact_match"], rows[2]["edit_distance"], rows[2]["greedy"]) == (0.0, 1.0, "4")
    s = tasks.summarize(rows)
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(1 / 3) and s["edit_distance"] == pytest.approx(0.5)
    with pytest.raises(UsageError, match="longer than the run's data.seq_len=4"):
        score_examples(model, tok, examples, context=4)


def test_task_files_and_bad_suites_are_one_line_and_exit_2(tmp_path, capsys):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"prompt": "2+2=", "answer": "4"}\n\n{"prompt": "3+3=", "answer": "6"}\n')
    assert tasks.load_suite(str(good)) == ("qa", [tasks.Example("2+2=", "4"), tasks.Example("3+3=", "6")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3="}\n')
    for suite, message in [
        (str(bad), f"--tasks {bad}:2: needs string fields prompt and answer, got " + repr('{"prompt": "3+3="}')),
        ("nosuch", "--tasks: unknown suite 'nosuch'; use one of arithmetic, copy, brackets or a JSONL task file"),
        (str(tmp_path / "gone.jsonl"), f"--tasks {tmp_path / 'gone.jsonl'}: no such task file"),
    ]:
        assert main(["eval", str(tmp_path), "--tasks", suite]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"scaling eval: error: {message}"]
    (tmp_path / "notjson.jsonl").write_text("prompt: 2+2\n")
    assert main(["eval", str(tmp_path), "--tasks", str(tmp_path / "notjson.jsonl")]) == 2
    assert "notjson.jsonl:1: not a JSON object" in capsys.readouterr().err
    assert json.loads(good.read_text().splitlines()[0])["answer"] == "4"


def test_observational_law_held_out_by_compute_on_ruan_et_al_data(validation_dir):
    """Ruan et al.'s observational law on their 148-model benchmark table: GSM8K predicted from
    3 principal capability measures of the other 7 benchmarks, fitted on the models below the
    80th compute percentile, checked on the 25 above; a compute-only sigmoid as the baseline."""
    import pandas as pd

    from scaling.fit.observational import observational

    df = pd.read_csv(validation_dir / "obsscaling_base_llm_benchmark_eval.csv")
    bench = ["MMLU", "ARC-C", "HellaSwag", "Winograd", "TruthfulQA", "XWinograd", "HumanEval"]
    r = observational(df, "GSM8K", bench, n_components=3, compute="FLOPs (1E21)", model="Model")
    d = r.to_dict()
    assert (d["n_fit"], d["n_heldout"]) == (98, 25) and d["explained"][0] == pytest.approx(0.652, abs=1e-3)
    assert d["mse"] == pytest.approx(0.0148, abs=5e-4) and d["mae"] == pytest.approx(0.0872, abs=5e-4)
    assert d["mse_compute_only"] == pytest.approx(0.0742, abs=5e-4)
    assert d["mse"] < d["mse_compute_only"] / 4  # capabilities predict what compute alone cannot
    with pytest.raises(UsageError, match="n_components must be between 1 and 7"):
        observational(df, "GSM8K", bench, n_components=8, compute="FLOPs (1E21)")


def test_two_step_law_recovers_both_steps_and_chains_them():
    """Task losses drawn from L(C) = 0.8 + 40 C^-0.15 and accuracies from a sigmoid in L: both
    steps come back and the chained forecast at 10x the largest compute matches the truth."""
    import pandas as pd

    from scaling.fit.two_step import two_step

    C = np.geomspace(1e15, 1e19, 9)
    L = 0.8 + 40 * C ** -0.15
    acc = 1 / (1 + np.exp(6.0 * (L - 1.6)))
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"C": C, "answer_nll": L * (1 + 0.002 * rng.standard_normal(9)),
                       "exact_match": np.clip(acc + 0.005 * rng.standard_normal(9), 0, 1)})
    r = two_step(df)
    assert r.loss_law.params["alpha"] == pytest.approx(0.15, abs=0.03)
    assert (r.k, r.L0) == (pytest.approx(6.0, rel=0.15), pytest.approx(1.6, abs=0.03))
    far = r.predict(1e20)
    truth_L = 0.8 + 40 * 1e20 ** -0.15
    assert far["task_loss"].iloc[0] == pytest.approx(truth_L, rel=0.02)
    assert far["accuracy"].iloc[0] == pytest.approx(1 / (1 + np.exp(6.0 * (truth_L - 1.6))), abs=0.03)
    with pytest.raises(UsageError, match="two_step: column acc not in the table"):
        two_step(df, accuracy="acc")


def test_training_source_never_holds_an_evaluated_prompt():
    """The tasks source trains on the suites' train split and holds out their eval split: no
    prompt is in both, at any eval seed, and both are the suite's own examples."""
    from scaling.config import DataConfig
    from scaling.data import sources

    docs = sources.documents(DataConfig(source="tasks", tasks=("arithmetic", "brackets"), task_examples=3000))
    train = {line.split("=")[0] + "=" if "+" in line else line.rsplit(" ", 1)[0] + " "
             for d in docs.train() for line in d.decode().splitlines()}
    assert len(train) > 1000
    for seed in (0, 1, 2):
        ev = tasks.builtin("arithmetic", n=500, seed=seed) + tasks.builtin("brackets", n=100, seed=seed)
        assert all(e.prompt.startswith(tasks.LINE_START) for e in ev)  # scored at the start of a line
        assert not train & {e.prompt.removeprefix(tasks.LINE_START) for e in ev}
        assert len(train & {e.prompt.removeprefix(tasks.LINE_START) for e in tasks.builtin("arithmetic", 500, seed,
                                                                                             split="train")}) > 50
    lines = [line for d in docs.validation() for line in d.decode().splitlines()]
    assert len(lines) == 2 * 500 and all(tasks.split_of(x.split("=")[0] + "=") == "eval" for x in lines if "+" in x)
    a, b = lines[0].split("=")[0].split("+")
    assert lines[0] == f"{a}+{b}={int(a) + int(b)}"


def test_tasks_in_a_mixture_and_bad_task_sources(tmp_path, capsys):
    from scaling.config import TrainConfig
    from scaling.data import corpus

    from conftest import assert_refused

    cfg = TrainConfig().with_overrides(["data.source=mixture", "data.mixture=stdlib=0.7,tasks:copy=0.3",
                                        "data.task_examples=2000"])
    info = corpus.corpus_info(cfg.data)
    assert set(info["components"]) == {"stdlib", "copy"} and info["components"]["copy"]["weight"] == 0.3
    assert info["components"]["copy"]["n_documents"] == 2000 // 64 + 1 + 1  # 32 train documents, 1 held out
    assert_refused(["data.source=tasks"], "data.tasks: data.source=tasks needs suites to train on, e.g. "
                   "data.tasks=arithmetic,copy (built-in: arithmetic, copy, brackets)", tmp_path, capsys)
    assert_refused(["data.source=tasks", "data.tasks=sums"], "data.tasks: unknown suite 'sums'; use built-in suites "
                   "(arithmetic, copy, brackets)", tmp_path, capsys)
    assert_refused(["data.tasks=copy"], "data.tasks: names suites for data.source=tasks only (in a mixture: "
                   "tasks:SUITE=WEIGHT)", tmp_path, capsys)
    assert_refused(["data.source=mixture", "data.mixture=stdlib=0.5,tasks:sums=0.5"], "data.mixture: 'tasks:sums' "
                   "names no task suite; use tasks:SUITE with one of arithmetic, copy, brackets", tmp_path, capsys)
    assert_refused(["eval_tasks=sums"], "eval_tasks: 'sums' is neither a built-in suite (arithmetic, copy, brackets) "
                   "nor a .jsonl task file", tmp_path, capsys)
    missing = tmp_path / "gone.jsonl"
    assert main(["train", "--out", str(tmp_path / "r2"), "--set", f"eval_tasks={missing}", "--set", "budget.steps=2",
                 "--set", "wandb=off"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"scaling train: error: eval_tasks: {missing}: no such task file"
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_end_of_training_scores_equal_scaling_eval(tmp_path, capsys):
    """A run with eval_tasks writes tasks.json and final_tasks/* at the end; ``scaling eval
    --tasks`` on the finished run's checkpoint gives the same numbers (one code path)."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"prompt": "copy ab: ", "answer": "ab"}\n{"prompt": "1+2=", "answer": "3"}\n')
    run = tmp_path / "run"
    sets = ["data.source=mixture", "data.mixture=stdlib=0.5,tasks:arithmetic=0.5", "data.task_examples=500",
            "data.seq_len=32", "data.batch_size=8", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "budget.steps=6", f"eval_tasks=arithmetic,{qa}", "eval_task_examples=7", "wandb=off", "progress=false"]
    args = ["train", "--out", str(run)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    at_end = json.loads((run / "tasks.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert at_end["step"] == 6 and [len(s["examples"]) for s in at_end["suites"].values()] == [7, 2]
    assert main(["eval", str(run), "--tasks", f"arithmetic,{qa}", "--examples", "7"]) == 2  # never overwritten
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"scaling eval: error: --out: {run / 'tasks.json'} exists "
                                                                "(scores are never overwritten); name another file with --out")
    assert json.loads((run / "tasks.json").read_text()) == at_end
    assert main(["eval", str(run), "--tasks", f"arithmetic,{qa}", "--examples", "7", "--out", str(tmp_path / "t.json")]) == 0
    again = json.loads((tmp_path / "t.json").read_text())
    for name in ("arithmetic", "qa"):
        for a, b in zip(at_end["suites"][name]["examples"], again["suites"][name]["examples"]):
            assert a["greedy"] == b["greedy"] and a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-4)
        for k, v in again["suites"][name]["summary"].items():
            if k != "n":
                assert summary[f"final_tasks/{name}/{k}"] == pytest.approx(v, abs=1e-5)
    capsys.readouterr()


def test_batched_scoring_equals_one_example_at_a_time():
    """The fixed-shape batched scorer (right padding, more examples than one batch, prompts and
    answers of many lengths) gives each example what the model gives it alone: the greedy
    continuation of ``generate`` and the teacher-forced log-likelihood of an unpadded forward."""
    from scaling.config import ModelConfig
    from scaling.models.sample import generate
    from scaling.models.transformer import Transformer

    tok = get_tokenizer("bytes")
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2), rngs=nnx.Rngs(3))
    examples = tasks.builtin("arithmetic", n=40, seed=5) + tasks.builtin("copy", n=30, seed=5)
    rows = score_examples(model, tok, examples, context=64)
    assert len({(len(e.prompt), len(e.answer)) for e in examples}) > 10 and len(rows) == 70
    for e, r in zip(examples[::7], rows[::7]):
        p, a = list(tok.encode(e.prompt)), list(tok.encode(e.answer))
        g = np.asarray(generate(model, jnp.asarray([p]), len(a), key=jax.random.key(0), temperature=0.0, context=64))
        assert r["greedy"] == tok.decode(g[0, len(p):].tolist())
        logits, _ = model(jnp.asarray([(p + a)[:-1]]), train=False)
        lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)[np.arange(len(p) - 1, len(p) + len(a) - 1), a]
        assert r["answer_logprob"] == pytest.approx(float(lp.sum()), abs=1e-4)
        assert r["exact_match"] == float(r["greedy"] == e.answer)


def test_task_fields_leave_old_trial_ids_and_seed_groups_alone():
    """A default config read back from JSON (tuples become lists) hashes as before the task
    fields existed; setting them changes the id."""
    from scaling import schema
    from scaling.config import TrainConfig, config_hash

    d = schema.without_late_defaults(json.loads(TrainConfig().to_json()))
    assert "eval_tasks" not in d and "eval_task_examples" not in d
    assert "tasks" not in d["data"] and "task_examples" not in d["data"]
    base = TrainConfig()
    assert config_hash(base.with_overrides(["eval_tasks=copy"])) != config_hash(base)
