"""`scaling sample`: text from a trained run's checkpoint, greedy decoding consistent with the
model's own forward pass, a sliding context window, and one-line errors for bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
from scaling.cli import main
from scaling.config import ModelConfig
from scaling.models.sample import generate
from scaling.models.transformer import Transformer
from scaling.train import loop
from scaling.train.sample_cli import load_model

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.batch_size=16",
        "data.eval_tokens=512", "log_every=5", "eval_every=10", "progress=false", "budget.steps=10"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    loop.run(experiments.get("dense").with_overrides(TINY), out)
    return out


def test_sample_cli_continues_the_prompt_from_the_checkpoint(run_dir, capsys):
    assert main(["sample", str(run_dir), "--prompt", "def f", "--tokens", "40", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def f")
    cfg, model, step = load_model(run_dir)
    assert step == 10
    greedy = generate(model, jnp.asarray([list(b"def f")], jnp.int32), 40, key=jax.random.key(0), temperature=0,
                      context=cfg.data.seq_len)
    assert text.rstrip("\n") == bytes(np.asarray(greedy[0], np.uint8)).decode("utf-8", errors="replace")


@pytest.mark.parametrize("argv, field", [
    (["--tokens", "0"], "--tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--samples", "0"], "--samples"),
])
def test_bad_sample_arguments_exit_2_with_one_line(run_dir, capsys, argv, field):
    assert main(["sample", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_sample_from_a_directory_without_a_run_exits_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_sliding_window_sees_only_the_latest_context_tokens():
    """With context c, the token generated at position t depends on tokens t-c..t-1 only: two
    prompts that differ before that window give the same greedy continuation's first token."""
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, init_std=0.2),
                        rngs=nnx.Rngs(0))
    a = jax.random.randint(jax.random.key(0), (1, 12), 0, 64)
    b = a.at[:, :4].set((a[:, :4] + 1) % 64)
    ga = generate(model, a, 1, key=jax.random.key(1), temperature=0, context=8)
    gb = generate(model, b, 1, key=jax.random.key(1), temperature=0, context=8)
    assert int(ga[0, -1]) == int(gb[0, -1])
    logits, _ = nnx.jit(lambda m, x: m(x))(model, a[:, 4:])
    assert int(ga[0, -1]) == int(jnp.argmax(logits[0, -1]))
