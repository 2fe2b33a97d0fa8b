"""A shard pattern from the shell to Hydra (train/overrides.py), checked against Hydra's own parsing."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launch.chain import compose_chain, parse_stages
from launch.config import compose_config
from train.config import ConfigError
from train.overrides import argv_for_hydra, for_hydra, later_wins, quote_for_hydra
from train_helpers import REPO

PATTERN = "/data/laion/{00000..09999}.tar"


def test_a_shell_quoted_brace_pattern_reaches_the_config_as_written():
    # What bash passes for stage.data.shards='/data/laion/{00000..09999}.tar': no quotes left.
    cfg = compose_config(["stage=mini_test", f"stage.data.shards={PATTERN}"])
    assert cfg.stage.data.shards == PATTERN
    # Hydra alone refuses it: the quoting is what makes it work.
    from hydra import compose, initialize_config_dir

    from train.main import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), pytest.raises(Exception, match="mismatched"):
        compose(config_name="config", overrides=["stage=mini_test", f"stage.data.shards={PATTERN}"])


@pytest.mark.parametrize("override", [
    "stage.data.shards='/a/{0..9}.tar'",       # quoted for Hydra already
    'stage.data.shards="/a/{0..9}.tar"',
    "stage.data.shards=[/a/0.tar,/a/1.tar]",  # a list
    "+extra={a: 1}",                          # a dict
    "run.dir=${run.root}/x",                  # an interpolation
    "stage.data.shards=/a/00000.tar",         # no pattern
    "optim.lr=1e-4",
    "--cfg",
])
def test_what_is_not_a_plain_brace_pattern_is_left_alone(override):
    assert quote_for_hydra(override) == override


def test_comma_patterns_and_pipe_urls_are_quoted_too():
    for value in ("/a/{x,y}.tar", "pipe:aws s3 cp s3://b/{00000..04999}.tar -"):
        assert compose_config(["stage=mini_test", f"stage.data.shards={value}"]).stage.data.shards == value


def test_a_brace_pattern_the_shell_expanded_is_refused():
    # bash turns stage.data.shards=/data/{00000..00002}.tar (unquoted) into three overrides; Hydra alone
    # would train on the last shard.
    expanded = [f"stage.data.shards=/data/{i:05d}.tar" for i in range(3)]
    with pytest.raises(ConfigError, match=r"stage.data.shards is given 3 times .*quote the pattern"):
        for_hydra(["stage=mini_test", *expanded])
    with pytest.raises(ConfigError, match="given 2 times"):
        compose_config(["stage=mini_test", "optim.lr=1", "optim.lr=2"])


def test_a_misspelt_setting_is_refused_with_the_nearest_name():
    """Hydra's own message for `stage.stepz=5` advised `+stage.stepz=5`, which the composed config's check
    then refused: the nearest name comes first now. Free-form maps, Hydra's own settings and `+key` pass."""
    with pytest.raises(ConfigError, match=r"no such setting: stage.stepz \(did you mean stage.steps\?\)"):
        compose_config(["stage=mini_test", "stage.data.shards=/a/0.tar", "stage.stepz=5"])
    with pytest.raises(ConfigError, match=r"optim.lrr \(did you mean optim.lr\?\); foo \(the top level has backend"):
        for_hydra(["optim.lrr=3", "foo=2"])
    cfg = compose_config(["stage=mini_test", "cluster=gpu_node", "cluster.env.NCCL_DEBUG=INFO", "stage.steps=5",
                          "hydra.job.chdir=false", "~cluster.env.TORCH_NCCL_ASYNC_ERROR_HANDLING"])
    assert cfg.stage.steps == 5 and dict(cfg.cluster.env) == {"NCCL_DEBUG": "INFO"}
    misspelt = subprocess.run([sys.executable, "-m", "train", "stage=mini_test", "stage.stepz=5"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert misspelt.returncode == 2 and "did you mean stage.steps?" in misspelt.stdout, misspelt.stdout + misspelt.stderr


def test_argv_keeps_hydra_flags():
    argv = ["-m", f"stage.data.shards={PATTERN}", "--cfg", "job", "backend=fsdp"]
    assert argv_for_hydra(argv) == ["-m", f"stage.data.shards='{PATTERN}'", "--cfg", "job", "backend=fsdp"]


def test_python_m_train_takes_the_shell_quoted_pattern_and_refuses_the_expanded_one(tmp_path):
    def train(*args):
        return subprocess.run([sys.executable, "-m", "train", "stage=mini_test", *args, "--cfg", "job"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    quoted = train(f"stage.data.shards={PATTERN}")
    assert quoted.returncode == 0, quoted.stderr
    assert f"shards: {PATTERN}" in quoted.stdout
    expanded = train("stage.data.shards=/data/00000.tar", "stage.data.shards=/data/00001.tar")
    assert expanded.returncode == 2 and "stage.data.shards is given 2 times" in expanded.stdout


def test_a_chain_stage_s_own_setting_replaces_the_common_one():
    assert later_wins(["a=1", "b=1"], ["b=2"], ["c=3"]) == ["a=1", "b=2", "c=3"]
    jobs = compose_chain(parse_stages("v1-1_256,v1-2"), [
        "optim.lr=3e-5", "v1-2:optim.lr=0",
        f"v1-1_256:stage.data.shards={PATTERN}", "v1-2:stage.data.shards=/latents/{00000..00009}.tar",
        "v1-2:stage.init.from_checkpoint=/elsewhere/export"], strict=False)
    first, second = (list(j.overrides) for j in jobs)
    assert "optim.lr=3e-5" in first and "v1-2:optim.lr=0" not in first
    assert "optim.lr=0" in second and "optim.lr=3e-5" not in second
    assert [o for o in second if o.startswith("stage.init.from_checkpoint=")] == \
        ["stage.init.from_checkpoint=/elsewhere/export"]  # the user's, not the chain's own
    assert compose_config(second).optim.lr == 0
    with pytest.raises(ConfigError, match="optim.lr is given 2 times"):
        compose_chain(parse_stages("v1-1_256"), ["optim.lr=1", "optim.lr=2"], strict=False)
