"""The block registry: a new block type declared in this one module (config section, counts,
mesh needs, call) trains, counts its FLOPs and shards with no edit anywhere else."""

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from scaling import blocks, flops
from scaling import sharding as S
from scaling.cli import main
from scaling.config import (BlockSections, ConfigError, MeshConfig, MoEConfig, ModelConfig, TrainConfig, config_hash,
                            hashed_dict)
from scaling.files import read_jsonl
from scaling.models.layers import HIDDEN, constrain, param
from scaling.models.transformer import Transformer

# ---- the whole new block type: a low-rank MLP, y = relu(x A) B, in every `every`-th layer ----


@dataclass(frozen=True)
class LowRankConfig:
    rank: int = 16
    every: int = 2

    def __post_init__(self):
        for name in ("rank", "every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.blocks.lowrank.{name}: must be a positive integer, got {v!r}")


def _rank(model) -> int:
    return dict(model.blocks)["lowrank"].rank


def lowrank_params(model, i):
    n = 2 * model.d_model * _rank(model)
    return flops.Count(n, n)


def lowrank_flops(model, i, n_tokens):
    return flops.mm(model.d_model, _rank(model)) + flops.mm(_rank(model), model.d_model)


def lowrank_shard_needs(model):
    yield "model.blocks.lowrank.rank", _rank(model), "mlp"


class LowRankMLP(nnx.Module):
    def __init__(self, cfg, layer, *, rngs):
        D, r = cfg.d_model, _rank(cfg)
        self.w_in = param(rngs, (D, r), ("embed", "mlp"), D ** -0.5)
        self.w_out = param(rngs, (r, D), ("mlp", "embed"), r ** -0.5 / cfg.n_layers)

    def __call__(self, x_BxLxD, train=True, **_):
        h_BxLxF = constrain(jax.nn.relu(x_BxLxD @ self.w_in[...].astype(x_BxLxD.dtype)), HIDDEN)
        return h_BxLxF @ self.w_out[...].astype(x_BxLxD.dtype), {"lowrank/active": jnp.mean(h_BxLxF > 0)}


KIND = blocks.register(blocks.BlockKind(
    name="lowrank", role="mlp", section=LowRankConfig, params=lowrank_params, flops_per_token=lowrank_flops,
    shard_needs=lowrank_shard_needs, module=LowRankMLP), replace=True)

# ---------------------------------------------------------------------------------------------

# d128: at d64 XLA's element-wise work is already 5.8% of the dense model's count
MODEL = ModelConfig(d_model=128, n_layers=2, n_heads=4, blocks=BlockSections({"lowrank": LowRankConfig(rank=32)}))


def test_counts_follow_the_model_and_xla():
    assert blocks.layer_names(MODEL) == ["dense", "lowrank"]
    model = nnx.eval_shape(lambda: Transformer(MODEL, rngs=nnx.Rngs(0)))
    sizes = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    counts = flops.param_counts(MODEL)
    assert counts.total == sizes
    dense = ModelConfig(d_model=128, n_layers=2, n_heads=4)
    # layer 1's dense MLP (2 x 128 x 512) is replaced by the rank-32 pair (2 x 128 x 32)
    assert flops.param_counts(dense).total - counts.total == 2 * 128 * 512 - 2 * 128 * 32
    assert flops.forward_flops_per_token(dense, 128) - flops.forward_flops_per_token(MODEL, 128) == 4 * 128 * 512 - 4 * 128 * 32
    # the family size rule sizes a base model holding the kind by its exact count
    from scaling.models.family import model_for_params

    sized = model_for_params(2e5, MODEL)
    assert dict(sized.blocks) == dict(MODEL.blocks)
    assert abs(flops.param_counts(sized).non_embedding / 2e5 - 1) < 0.15
    from test_flops import _xla_train_step_flops

    analytic = flops.hardware_train_flops_per_token(MODEL, 128, "xla") * 4 * 128
    assert 1.0 <= _xla_train_step_flops(MODEL, 4, 128) / analytic < 1.05


def test_config_section_round_trips_and_names_its_fields():
    cfg = TrainConfig().with_overrides(["model.blocks.lowrank=on", "model.blocks.lowrank.rank=8"])
    assert dict(cfg.model.blocks) == {"lowrank": LowRankConfig(rank=8)}
    assert json.loads(cfg.to_json())["model"]["blocks"] == {"lowrank": {"rank": 8, "every": 2}}
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert cfg.with_overrides(["model.blocks.lowrank=none"]).model.blocks == BlockSections()
    # a model without registered kinds keeps the trial id it had before model.blocks existed
    assert "blocks" not in hashed_dict(TrainConfig())["model"]
    assert config_hash(cfg) != config_hash(TrainConfig())
    with pytest.raises(ConfigError, match=r"^model.blocks.lowrank.rank: must be a positive integer, got 0"):
        cfg.with_overrides(["model.blocks.lowrank.rank=0"])
    with pytest.raises(ConfigError, match=r"^model.blocks.nope: unknown block kind \(registered: .*lowrank"):
        cfg.with_overrides(["model.blocks.nope.rank=3"])
    with pytest.raises(ConfigError, match=r"^model.blocks.moe: moe has its own section; use model.moe"):
        cfg.with_overrides(["model.blocks.moe=on"])
    with pytest.raises(ConfigError, match=r"layer 1 would hold two mlp kinds \(model.moe and model.blocks.lowrank\)"):
        cfg.with_overrides(["model.moe=on"])
    with pytest.raises(ConfigError, match=r"^model.blocks.tyo: unknown block kind"):
        ModelConfig(blocks={"tyo": LowRankConfig()})  # built directly, not only through --set
    with pytest.raises(ConfigError, match=r"^model.blocks.lowrank: expects a LowRankConfig, got MoEConfig"):
        ModelConfig(blocks={"lowrank": MoEConfig()})
    assert ModelConfig(blocks={"lowrank": LowRankConfig()}) == ModelConfig(blocks=BlockSections({"lowrank": LowRankConfig()}))
    odd = cfg.with_overrides(["model.blocks.lowrank.rank=6"])
    S.validate(cfg.model, cfg.data, {"tensor": 4})
    with pytest.raises(ConfigError, match=r"^model.blocks.lowrank.rank: 6 is not divisible by mesh.tensor=4"):
        S.validate(odd.model, odd.data, {"tensor": 4})


@pytest.mark.slow
def test_new_block_trains_and_shards_like_one_device(tmp_path):
    """Trained through the CLI on 8 devices as data=8 and as data=4 x tensor=2 (its rank split
    over tensor): the same losses, and the loss falls."""
    cfg = TrainConfig().with_overrides([
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.blocks.lowrank.rank=8",
        "data.source=synthetic", "data.seq_len=16", "data.batch_size=16", "data.eval_tokens=512",
        "budget.steps=30", "log_every=5", "eval_every=30", "optim.lr=3e-3", "progress=false"])
    mesh = S.make_mesh(MeshConfig(data=4, tensor=2))
    model = S.create_sharded_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)), mesh)
    w_in = model.blocks[1].mlp.w_in
    assert w_in.shape == (32, 8) and w_in[...].addressable_shards[0].data.shape == (32, 4)  # rank over tensor
    losses = {}
    for name, mesh_set in (("data", []), ("tensor", ["--set", "mesh.tensor=2"])):
        path = tmp_path / f"{name}.json"
        path.write_text(cfg.to_json())
        assert main(["train", "--config", str(path), *mesh_set, "--no-progress", "--out", str(tmp_path / name)]) == 0
        rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r]
        losses[name] = [r["loss"] for r in rows]
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        per_token = flops.train_flops_per_token(cfg.model, 16)
        assert summary["flops"] == pytest.approx(per_token * 30 * cfg.tokens_per_step)
        assert any("l1/lowrank/active" in r for r in rows)
    assert losses["data"][-1] < losses["data"][0] - 0.3
    assert losses["tensor"] == pytest.approx(losses["data"], rel=2e-4)
