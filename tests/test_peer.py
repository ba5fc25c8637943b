"""PEER and product-key memory (``model.blocks.peer`` / ``pkm``): the product-key top-k is the
brute-force top-k, the layers reduce to their closed forms, the counts match the parameters and
XLA, the logits are causal, a model trains, and bad sections are refused in one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_refused
from flax import nnx

from scaling import flops
from scaling.blocks.peer import PEERConfig, PKMConfig
from scaling.cli import main
from scaling.config import BlockSections, ModelConfig, TrainConfig
from scaling.models.peer import PEERLayer, PKMLayer, product_top_k
from scaling.models.transformer import Transformer


@pytest.mark.parametrize("W,k", [(8, 1), (8, 8), (32, 8), (16, 5)])
def test_product_key_top_k_equals_brute_force_over_all_pairs(W, k):
    rng = np.random.default_rng(W * 100 + k)
    s1 = jnp.asarray(rng.normal(size=(3, 7, W)).astype(np.float32))
    s2 = jnp.asarray(rng.normal(size=(3, 7, W)).astype(np.float32))
    scores, index = product_top_k(s1, s2, k)
    all_pairs = (s1[..., :, None] + s2[..., None, :]).reshape(3, 7, W * W)  # index i * W + j
    want_scores, want_index = jax.lax.top_k(all_pairs, k)
    np.testing.assert_array_equal(np.asarray(index), np.asarray(want_index))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_scores))  # the same additions: bitwise


def _cfg(kind, **sec):
    section = (PEERConfig if kind == "peer" else PKMConfig)(**sec)
    return ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64, blocks=BlockSections({kind: section}))


def test_one_expert_and_top_1_reduce_to_the_closed_form():
    x = jax.random.normal(jax.random.key(0), (2, 5, 32), jnp.float32)
    layer = PEERLayer(_cfg("peer", n_experts=1, top_k=1, heads=1), 0, rngs=nnx.Rngs(1))
    y, _ = layer(x)
    u, v = layer.w_down[...][0], layer.w_up[...][0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.gelu(x @ u)[..., None] * v), rtol=1e-6, atol=1e-7)
    three = PEERLayer(_cfg("peer", n_experts=1, top_k=1, heads=3), 0, rngs=nnx.Rngs(1))  # heads add up
    y3, _ = three(x)
    u, v = three.w_down[...][0], three.w_up[...][0]
    np.testing.assert_allclose(np.asarray(y3), np.asarray(3 * jax.nn.gelu(x @ u)[..., None] * v), rtol=1e-5, atol=1e-7)
    memory = PKMLayer(_cfg("pkm", n_experts=1, top_k=1, heads=1), 0, rngs=nnx.Rngs(1))
    y, _ = memory(x)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(memory.values[...][0]), y.shape))


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_counts_equal_the_parameters_and_xla(kind):
    from test_flops import _xla_train_step_flops

    cfg = dataclasses.replace(_cfg(kind, n_experts=256, top_k=4, heads=2), d_model=128)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert flops.param_counts(cfg).total == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    analytic = flops.hardware_train_flops_per_token(cfg, 128, "xla") * 4 * 128
    ratio = _xla_train_step_flops(cfg, 4, 128) / analytic
    assert 0.9 <= ratio <= 1.1, ratio
    # active parameters: the retrieval network, every sub-key and the picked slots (2 x 4 per layer)
    counts = flops.param_counts(cfg)
    slot = (2 if kind == "peer" else 1) * 128
    assert counts.total - counts.active == 2 * (256 - 2 * 4) * slot


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_logits_are_causal(kind):
    cfg = _cfg(kind, n_experts=64, top_k=4, heads=2, query_norm="layer")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64, dtype=jnp.int32)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert float(jnp.max(jnp.abs(a[:, t:] - b[:, t:]))) > 1e-4


@pytest.mark.parametrize("sets,message", [
    (["model.blocks.peer.n_experts=1000"],
     "model.blocks.peer.n_experts: must be a perfect square (product keys split it into two tables of sqrt(n) keys), "
     "got 1000; use 961 or 1024"),
    (["model.blocks.pkm.top_k=40"],
     "model.blocks.pkm.top_k: 40 is larger than a sub-key table (sqrt(1024) = 32 keys); use at most 32"),
    (["model.blocks.peer.query_norm=batch"],
     "model.blocks.peer.query_norm: must be one of rms, layer, none; got 'batch'"),
])
def test_bad_sections_are_one_line_and_exit_2(sets, message, tmp_path, capsys):
    assert_refused(sets, message, tmp_path, capsys)


def test_an_unknown_ffn_name_is_one_line_and_exit_2(tmp_path, capsys):
    """The choices are the registry's MLP-role kinds (other tests may have registered more)."""
    from scaling import blocks

    choices = ", ".join(["mlp"] + [k.name for k in blocks.kinds() if k.role == "mlp"])
    assert choices.startswith("mlp, moe, peer, pkm")
    assert_refused(["model.ffn=mod"], f"model.ffn: must be one of {choices}; got 'mod'", tmp_path, capsys)


def test_model_ffn_switches_the_mlp_kind():
    """``model.ffn`` is one switch over the MLP-role sections: the one named on (defaults unless
    set), the others off, and it reads back; the same model whichever way it was written."""
    from scaling.config import MoEConfig
    from scaling.overrides import apply_overrides, build

    moe = TrainConfig().with_overrides(["model.moe=on"])
    peer = moe.with_overrides(["model.ffn=peer", "model.blocks.peer.top_k=4"])
    assert (moe.model.ffn, peer.model.ffn) == ("moe", "peer")
    assert peer.model.moe is None and dict(peer.model.blocks)["peer"] == PEERConfig(top_k=4)
    assert apply_overrides(peer.model, ["ffn=peer"]) == peer.model  # an existing section is kept
    assert peer.with_overrides(["model.ffn=pkm"]).model.blocks.as_dict().keys() == {"pkm"}
    assert peer.with_overrides(["model.ffn=mlp"]).model == TrainConfig().model
    assert peer.with_overrides(["model.ffn=moe"]).model.moe == MoEConfig()
    assert build(TrainConfig, {"model": {"ffn": "peer", "blocks": {"peer": {"top_k": 4}}}}).model == peer.model


def test_a_peer_model_trains(tmp_path):
    from scaling.files import read_jsonl

    cfg = TrainConfig().with_overrides([
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.blocks.peer.n_experts=256",
        "model.blocks.peer.top_k=4", "model.blocks.peer.heads=2", "data.seq_len=32",
        "data.batch_size=16", "data.eval_tokens=512", "budget.steps=40", "log_every=10", "eval_every=40",
        "optim.lr=1e-2", "progress=false"])
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    assert main(["train", "--config", str(path), "--no-progress", "--out", str(tmp_path / "r")]) == 0
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # the embedded text (the synthetic source teaches
    # a model this small nothing in 40 steps, dense or PEER, and its queries then collapse onto 8 experts)
    assert 0.05 < rows[-1]["l1/peer/used_fraction"] <= 1
