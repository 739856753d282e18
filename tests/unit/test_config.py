"""Every YAML in conf/ composes against its schema; bad keys, types and combinations fail early."""
from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conf.schema import Config
from pipelines.validate import validate
from tasks.common import UserError
from tests.conftest import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "__pycache__"))


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "files"):
        overrides.append(f"data.paths=[{tmp_path}/*.txt]")
    if (group, option) == ("task", "jsonl"):
        overrides.append(f"task.train_path={tmp_path}/train.jsonl")
    if (group, option) == ("tokenizer", "pretrained"):
        overrides.append(f"tokenizer.path={tmp_path}/tokenizer.json")
    cfg = compose_config(overrides)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    assert cfg.experiment_name == experiment
    validate(cfg)


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_config(["+experiment=tiny", "pretrain.no_such_key=1"])


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError), match="max_steps"):
        compose_config(["+experiment=tiny", "pretrain.max_steps=many"])


@pytest.mark.parametrize("override,key", [
    ("tokenizer.seq_len=512", "tokenizer.seq_len"),
    ("pretrain.global_batch_size=6", "pretrain.global_batch_size"),
    ("pretrain.zero_stage=4", "pretrain.zero_stage"),
    ("finetune.method=adapters", "finetune.method"),
    ("model.num_heads=3", "model.hidden_size"),
    ("pretrain.precision=fp8", "pretrain.precision"),
    ("task.prompt_template=no-placeholder", "task.prompt_template"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size"),
    ("tokenizer.eos_token=''", "tokenizer.eos_token"),
    ("tokenizer.chat_template='{% for m in messages %}'", "tokenizer.chat_template"),
    ("experiment_name=../../etc", "experiment_name"),
    ("pretrain.on_nonfinite=ignore", "pretrain.on_nonfinite"),
    ("+task.fields.answer=category", "task.fields"),
    ("data.paths=[README.md]", "data.paths"),  # the default data=stdlib is still active: say which override
    ("task.train_path=README.md", "task.train_path"),  # the built-in task would ignore the file
    ("paths.root=README.md", "paths.root"),  # a file: one line, not Hydra's NotADirectoryError
    ("finetune.pooling=max", "finetune.pooling"),
    (("finetune.method=prefix", "finetune.pooling=mean"), "finetune.pooling"),  # PEFT rebuilds a last-token head
    (("finetune.objective=lm", "finetune.pooling=mean"), "finetune.pooling"),
])
def test_inconsistent_config_names_the_key(override, key):
    cfg = compose_config(["+experiment=tiny", *([override] if isinstance(override, str) else override)])
    with pytest.raises(UserError, match=f"^{key}"):
        validate(cfg)


def test_experiment_outside_the_repo(tmp_path):
    """A user keeps experiments in their own folder and adds it to Hydra's search path."""
    user = tmp_path / "my_conf" / "experiment"
    user.mkdir(parents=True)
    (user / "mine.yaml").write_text("# @package _global_\nexperiment_name: mine\npretrain:\n  max_steps: 3\n")
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "+experiment=mine"])
    assert cfg.experiment_name == "mine" and cfg.pretrain.max_steps == 3


def test_finetune_file_with_missing_field_is_reported_by_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    cfg = compose_config(["+experiment=tiny", "task=jsonl", f"task.train_path={data}"])
    with pytest.raises(UserError, match=rf"{data}:2: missing field 'label'"):
        validate(cfg)


def test_branch_names_cannot_leave_the_artifact_root():
    import dataclasses

    cfg = compose_config(["+experiment=tiny_compare"])
    validate(cfg)
    bad = dataclasses.replace(cfg, finetunes={"../escape": cfg.finetunes["lora"]})
    with pytest.raises(UserError, match=r"^finetunes\.\.\./escape: a branch name is"):
        validate(bad)


def test_optimizer_offload_needs_zero():
    cfg = compose_config(["+experiment=tiny", "pretrain.offload_optimizer=true", "pretrain.zero_stage=0"])
    with pytest.raises(UserError, match="^pretrain.offload_optimizer: needs pretrain.zero_stage 1, 2 or 3"):
        validate(cfg)


@pytest.mark.parametrize("override,message", [
    ("+data.max_doc_chars=5", "data.max_doc_chars: not a setting lmforge knows, did you mean data.filters.max_doc_chars?"),
    ("+finetune.lora.rank=4", "finetune.lora.rank: not a setting lmforge knows, did you mean finetune.lora.r?"),
    ("+task.label_field=label", "task.label_field: not a setting lmforge knows, did you mean task.fields?"),
    ("+zzz=1", "zzz: not a setting lmforge knows, see conf/schema.py"),
    ("finetune.method=full", "finetune.method=full: its lr 0.003 comes from conf/finetune/lora.yaml (lora's default; "
                             "full's is 0.0005); write finetune=full"),
])
def test_keys_added_with_plus_and_switched_methods_stop_at_start(override, message):
    """Hydra lets `+` add any key, and building the dataclasses would drop it without a word."""
    from pipelines import submit

    with pytest.raises(UserError, match="^" + re.escape(message)):
        submit.compose(["+experiment=tiny", override])


def test_a_switched_method_with_its_own_lr_or_file_passes():
    from pipelines import submit

    assert submit.compose(["+experiment=tiny", "finetune.method=full", "finetune.lr=0.001"]).finetune.lr == 0.001
    assert submit.compose(["+experiment=tiny", "finetune=full"]).finetune.lr == 0.0005
    assert submit.compose(["+experiment=tiny_compare"]).finetunes  # branches composed from their method files
    with pytest.raises(UserError, match=r"^finetunes.lora.lrr: .*did you mean finetunes.lora.lr\?"):
        submit.compose(["+experiment=tiny_compare", "+finetunes.lora.lrr=1"])


@pytest.mark.parametrize("overrides,key", [
    (["+experiment=tiny", "pretrain.lr=1e6"], "pretrain.lr"),
    (["+experiment=tiny", "pretrain.max_steps=1000000000"], "pretrain.max_steps"),  # 1e9 itself is a float: Hydra rejects its type
    (["+experiment=tiny", "pretrain.micro_batch_size=100000"], "pretrain.micro_batch_size"),
    (["+experiment=tiny", "pretrain.global_batch_size=1048576"], "pretrain.global_batch_size"),
    (["+experiment=tiny", "finetune.lr=2"], "finetune.lr"),
    (["+experiment=tiny", "finetune.max_epochs=5000"], "finetune.max_epochs"),
    (["+experiment=tiny_compare", "finetunes.full.lr=10"], "finetunes.full.lr"),
])
def test_absurd_values_stop_with_the_key_and_what_is_sensible(overrides, key):
    """Issue 17: values no run means (a learning rate of a million) passed every check."""
    cfg = compose_config(overrides)
    with pytest.raises(UserError, match=rf"^{re.escape(key)}: must be at most [0-9e+.]+, got .+ \(.+\)$"):
        validate(cfg)
    if key.endswith(".lr"):
        with pytest.raises(UserError, match="a learning rate above 1 diverges; typical values 1e-4..1e-2"):
            validate(cfg)


def test_bounds_belong_to_the_field_not_to_its_bare_name():
    """A new setting named like a bounded one (`rate`, a share of words at most 1) inherits nothing;
    its own declared bounds apply, under its own key."""
    import dataclasses

    from conf.schema import bounded
    from pipelines.validate import check_bounds

    @dataclasses.dataclass
    class Limiter:
        rate: float = 5000.0
        """Requests per second: no bound declared."""
        dropout: float = bounded(2.0, 0)
        """A bound of its own (no `below=1`)."""

    @dataclasses.dataclass
    class Tree:
        limiter: Limiter = dataclasses.field(default_factory=Limiter)
        robustness_rate: float = bounded(0.1, 0, at_most=1)

    check_bounds(Tree())  # rate=5000 and dropout=2 pass: `rate` and `dropout` elsewhere are shares
    with pytest.raises(UserError, match=r"^limiter\.dropout: must be at least 0, got -1"):
        check_bounds(Tree(limiter=Limiter(dropout=-1.0)))
    with pytest.raises(UserError, match=r"^robustness_rate: must be at most 1, got 1.5"):
        check_bounds(Tree(robustness_rate=1.5))
    cfg = compose_config(["+experiment=tiny", "eval.robustness.rate=1.5"])
    with pytest.raises(UserError, match=r"^eval\.robustness\.rate: must be at most 1, got 1.5"):
        check_bounds(cfg)
