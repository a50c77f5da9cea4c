"""Recipes load into typed configs; bad keys and types are rejected with the valid keys listed."""

import pytest

from myriad.config import RunConfig, from_dict, load_recipe, shipped_recipes, to_dict
from myriad.errors import UserError
from myriad.model import count_parameters


def test_shipped_recipes_include_the_documented_ones():
    documented = {"base", "hunyuan-1t", "tiny-zh", "tiny-zh-attnreuse", "tiny-zh-wordroute"}
    assert documented <= set(shipped_recipes())


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_loads_and_round_trips(name):
    cfg = load_recipe(name)
    assert cfg.name == name
    assert from_dict(RunConfig, to_dict(cfg), where="x") == cfg


def test_hunyuan_1t_is_paper_scale():
    cfg = load_recipe("hunyuan-1t")
    counts = count_parameters(cfg.model)
    assert cfg.model.moe.num_experts == 1536
    # 26 layers, 13 MoE layers of 1,536 SwiGLU experts of 3 * 4096 * 4096 weights each.
    assert counts.experts == 13 * 1536 * 3 * 4096 * 4096
    assert counts.total == 1_009_013_444_608
    assert counts.active == 4_645_408_768


def test_overrides_parse_toml_literals():
    cfg = load_recipe(
        "tiny-zh",
        [
            "train.lr=3e-4",
            "model.moe.num_experts=16",
            "data.whole_word_mask=true",
            "data.corpus=a.txt",
        ],
    )
    assert cfg.train.lr == 3e-4
    assert cfg.model.moe.num_experts == 16
    assert cfg.data.whole_word_mask is True
    assert cfg.data.corpus == "a.txt"


def test_int_is_accepted_for_float():
    assert load_recipe("tiny-zh", ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrate=1", "unknown key 'train.lrate'; valid keys: train.seed, train.steps"),
        ("model.moe.experts=4", "valid keys: model.moe.num_experts"),
        ("model.d_model=big", "model.d_model must be int, got 'big'"),
        ("train.steps=1.5", "train.steps must be int"),
        ("data.whole_word_mask=1", "data.whole_word_mask must be bool"),
        ("model.moe=3", "model.moe must be a section"),
        ("model.moe.top_k=9", "top_k must be in [1, num_experts]"),
        ("model.moe.router_input=expert", "model.moe.router_input must be one of hidden, word"),
        ("model.attn_reuse.every=x", "model.attn_reuse.every must be int"),
        ("model.attn_reuse.inference=rrr", "model.attn_reuse.inference must be 'reuse'"),
        ("novalue", "--set expects section.key=value"),
        ("model.n_heads=0", "model.n_heads must be >= 1, got 0"),  # was a ZeroDivisionError
        ("model.n_layers=-1", "model.n_layers must be >= 1, got -1"),  # was a 0-layer model
        ("model.d_model=0", "model.d_model must be >= 1, got 0"),
        ("model.d_ff=0", "model.d_ff must be >= 1, got 0"),
        ("model.moe.d_expert=0", "model.moe.d_expert must be >= 1, got 0"),
        ("model.moe.num_shared_experts=-1", "model.moe.num_shared_experts must be >= 0, got -1"),
        ("model.n_kv_heads=-1", "model.n_kv_heads must be >= 0, got -1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as info:
        load_recipe("tiny-zh", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unused_widths_may_be_zero():
    """d_ff sizes dense FFN layers only, d_expert MoE layers only: unused, any value goes."""
    assert load_recipe("tiny-zh", ["model.moe.every=1", "model.d_ff=0"]).model.d_ff == 0
    assert (
        load_recipe("tiny-zh", ["model.moe.every=0", "model.moe.d_expert=0"]).model.moe.every == 0
    )


def test_unknown_key_in_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[train]\nstpes = 3\n")
    with pytest.raises(UserError) as info:
        load_recipe(str(path))
    assert str(path) in str(info.value) and "train.stpes" in str(info.value)


def test_invalid_toml_and_missing_recipe(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(str(path))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(str(tmp_path / "absent.toml"))
    with pytest.raises(UserError, match="unknown recipe 'tiny'; shipped recipes: base"):
        load_recipe("tiny")


def test_warm_up_longer_than_the_run_is_warned_about_not_refused():
    from myriad.train.config import TrainConfig
    from myriad.train.optim import lr_multiplier
    from myriad.train.pretrain import schedule_warning

    assert schedule_warning(TrainConfig(steps=100, warmup_steps=60)) is None
    said = schedule_warning(TrainConfig(steps=20, warmup_steps=80))
    assert said is not None and "train.warmup_steps (80) >= train.steps (20)" in said
    peak = lr_multiplier(19, steps=20, warmup_steps=80, min_lr_ratio=0.1)  # the last step's
    assert f"peaks at {peak:.0%} of train.lr" in said and peak == 0.25
