"""gr-train as a day-to-day tool: log lines in a file, configs checked at load, --help/--print-config, gr-eval."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gr_models import eval_cli
from gr_models.cli import main
from gr_models.logs import OncePerMessage, remove_logging
from gr_models.trainer import load_config
from gr_models.trainer.config import RunConfig, config_to_yaml
from gr_models.trainer.config_checks import RULES, ConfigError

TINY = """
name: tiny
task: ranking
device: cpu
data:
  dataset: synthetic
  options: {num_users: 48, num_items: 30, num_clusters: 2, min_events: 6, max_events: 12, num_tasks: 2}
  max_sequence_length: 10
  holdout: 2
  max_train_candidates: 2
  batch_size: 16
hstu: {hidden_size: 8, kv_channels: 4, num_attention_heads: 2, num_layers: 1, kernel_backend: pytorch}
train: {max_steps: 6, eval_every: 3, log_every: 2, checkpoint_every: 6}
"""


@pytest.fixture(autouse=True)
def _drop_cli_logging() -> Iterator[None]:
    """main() installs a log handler on the stdout of its test; remove it so later tests do not write there."""
    yield
    remove_logging()


STEP_LINE = re.compile(
    r"INFO step (\d+)/6 \| loss \d+\.\d{4} \| lr \S+ \| \d+\.\d samples/s \| \d+ tokens/s \| ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(config file, run directory, stdout) of one 6-step run, stdout captured as a file (not a terminal)."""
    root = tmp_path_factory.mktemp("tiny")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    run_dir = root / "run"
    capture = pytest.MonkeyPatch()
    out = root / "stdout.txt"
    with open(out, "w") as handle:
        capture.setattr("sys.stdout", handle)
        try:
            assert main(["--config", str(config), f"output_dir={run_dir}"]) == 0
        finally:
            capture.undo()
    return config, run_dir, out.read_text()


def test_a_log_file_gets_one_line_per_logged_step_and_per_evaluation_and_no_bar_frames(trained) -> None:
    _, _, text = trained
    assert "\r" not in text  # no tqdm frames although train.progress_bar is on: stdout is a file
    steps = [int(m.group(1)) for line in text.splitlines() if (m := STEP_LINE.search(line))]
    assert steps == [2, 4, 6]
    evaluations = [line for line in text.splitlines() if "INFO eval at step" in line]
    assert [line.split("eval at step ")[1].split(":")[0] for line in evaluations] == ["0", "3", "6"]
    assert "auc/click=" in evaluations[0]


def test_progress_bar_off_keeps_the_training_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    overrides = [f"output_dir={tmp_path / 'run'}", "train.progress_bar=false", "train.max_steps=2"]
    assert main(["--config", str(config), *overrides, "train.eval_every=0", "train.checkpoint_every=0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(bool(re.search(r"INFO step 2/2 \| loss ", line)) for line in lines) == 1
    assert sum("INFO eval at step 2:" in line for line in lines) == 1


def test_log_level_warning_hides_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    overrides = [f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=0"]
    assert main(["--config", str(config), *overrides, "train.checkpoint_every=0", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "INFO" not in out and "final metrics after 2 steps" in out


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=-3", "config key 'train.max_steps' = -3 is not allowed: must be >= 0"),
        ("data.batch_size=0", "config key 'data.batch_size' = 0 is not allowed: must be >= 1"),
        ("optim.schedule=cosin", "'optim.schedule' = 'cosin' is not allowed: must be one of 'constant', 'linear'"),
        ("hstu.dropout=1.5", "'hstu.dropout' = 1.5 is not allowed: must be in [0, 1)"),
        ("optim.betas=[0.9]", "'optim.betas' = [0.9] is not allowed: must be 2 values in [0, 1)"),
        ("data.options.num_user=5", "'data.options.num_user' is not an option of dataset 'synthetic'"),
        ("train.max_steps=ten", "config key 'train.max_steps' must be int, got 'ten'"),
    ],
)
def test_bad_values_fail_at_load_with_one_line(
    override: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([override]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_exception() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        main(["train.max_steps=-3", "--debug"])


def test_every_config_key_has_a_rule_and_the_defaults_pass_it() -> None:
    def keys(cls: type, prefix: str = "") -> list[str]:
        hints = typing.get_type_hints(cls)
        found = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                found += keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                found.append(f"{prefix}{f.name}")
        return found

    all_keys = keys(RunConfig)
    assert sorted(k for k in all_keys if k not in RULES) == []
    assert sorted(k for k in RULES if k not in all_keys) == []
    assert load_config(None, []) == RunConfig()


def test_switching_dataset_by_override_drops_the_old_datasets_options(tmp_path: Path) -> None:
    config = tmp_path / "ml.yaml"
    config.write_text("data: {dataset: movielens, path: /data/ml-1m, options: {variant: 1m, with_user_id: false}}\n")
    switched = load_config(config, ["data.dataset=synthetic"])
    assert switched.data.options == {} and switched.data.path is None
    kept = load_config(config, ["data.dataset=synthetic", "data.options={num_users: 64}"])
    assert kept.data.options == {"num_users": 64}
    same = load_config(config, ["data.dataset=movielens"])
    assert same.data.options == {"variant": "1m", "with_user_id": False}


def test_help_lists_sections_and_keys_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train.max_steps = 1000  (int; >= 0)" in out
    assert "optim.schedule = 'constant'  (str; one of 'constant', 'linear', 'cosine')" in out
    assert "\ndata: " in out and "\nparallel: " in out


def test_print_config_prints_the_merged_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    assert main(["--config", str(config), "train.max_steps=9", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["train"]["max_steps"] == 9
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == load_config(config, ["train.max_steps=9"])
    assert config_to_yaml(load_config(tmp_path / "printed.yaml")) == printed
    assert not (tmp_path / "runs").exists()


def test_dependency_messages_pass_once_and_own_messages_always() -> None:
    once = OncePerMessage()

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    assert once.filter(record("torchrec.distributed", "fbgemm op missing"))
    assert not once.filter(record("torchrec.distributed", "fbgemm op missing"))
    assert once.filter(record("torchrec.distributed", "another message"))
    assert once.filter(record("gr_models.trainer", "step 1")) and once.filter(record("gr_models.trainer", "step 1"))


def test_gr_eval_writes_new_files_and_reproduces_the_final_metrics(trained, capsys) -> None:
    config, run_dir, _ = trained
    checkpoint = run_dir / "checkpoints" / "step_6"
    training_record = (run_dir / "metrics.json").read_text()
    assert eval_cli.main(["--checkpoint", str(checkpoint)]) == 0
    assert eval_cli.main(["--checkpoint", str(checkpoint), "data.eval_batch_size=5"]) == 0
    assert main(["--config", str(config), f"output_dir={run_dir}", "--eval-only"]) == 0
    written = sorted(p.name for p in (run_dir / "eval").iterdir())
    assert written == ["step_6-2.json", "step_6-3.json", "step_6.json"]
    assert (run_dir / "metrics.json").read_text() == training_record
    final = json.loads(training_record)["metrics"]
    for name in written:
        record = json.loads((run_dir / "eval" / name).read_text())
        assert record["checkpoint"] == str(checkpoint.resolve())
        assert record["metrics"] == pytest.approx(final, abs=1e-6)
    assert json.loads((run_dir / "eval" / "step_6.json").read_text())["metrics"] == final  # same batches: exact
    capsys.readouterr()
    out = run_dir / "eval" / "mine.json"
    assert eval_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert eval_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert eval_cli.main(["--checkpoint", str(run_dir)]) == 2
    assert "is not a checkpoint directory" in capsys.readouterr().err
