"""docs/config.md is what the config models generate, every field is described, `run`'s flags are
all in the reference, and examples/bpfsync.full.yaml sets every field and loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from bpfsync.agent.config import SyncConfig, WatchConfig, load_config
from bpfsync.cli import reference
from bpfsync.cli.main import RUN_FLAGS, app

ROOT = Path(__file__).resolve().parents[2]
CONFIG_MD = ROOT / "docs" / "config.md"
FULL_EXAMPLE = ROOT / "examples" / "bpfsync.full.yaml"
# options of `run` that set no config field (typer adds --no-insecure, which run ignores)
_NOT_FIELDS = {"--config", "-c", "--log-level", "--help", "--no-insecure"}


def test_config_md_is_current() -> None:
    current = CONFIG_MD.read_text() if CONFIG_MD.exists() else ""
    assert current == reference.render(), (
        f"docs/config.md is stale: regenerate it with `{reference.COMMAND}` "
        "(.venv/bin/python -m bpfsync.cli.reference) and commit the result"
    )


def test_check_mode_says_how_to_regenerate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "config.md"
    out.write_text("old\n")
    assert reference.main(["--check", "--output", str(out)]) == 1
    assert reference.COMMAND in capsys.readouterr().err
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(out)]) == 0


def test_every_field_is_described_and_documented() -> None:
    text = reference.render()
    for path, info in reference.fields():
        assert info.description and len(info.description) > 20, f"{path} has no description"
        assert f"### `{path}`" in text


def test_the_flag_table_is_run_s_options() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    run = group.commands["run"]
    options = {opt for p in run.params for opt in (*p.opts, *p.secondary_opts)} - _NOT_FIELDS
    in_table = {flag for flags in RUN_FLAGS.values() for flag in flags.split("/")}
    assert in_table == options
    paths = {path for path, _ in reference.fields()}
    assert set(RUN_FLAGS) <= paths


def _paths(data: Any, prefix: str = "") -> set[str]:
    """The YAML paths a parsed config sets, lists of mappings as ``name[]``."""
    out: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.add(path)
            out |= _paths(value, path)
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for item in data:
            out |= _paths(item, prefix + "[]")
    return out


def test_the_full_example_sets_every_field_and_loads() -> None:
    cfg = load_config(FULL_EXAMPLE)
    data = yaml.safe_load(FULL_EXAMPLE.read_text())
    missing = {path for path, _ in reference.fields()} - _paths(data)
    assert not missing, f"examples/bpfsync.full.yaml lacks {sorted(missing)}"
    # its comments say these are the defaults: keep them so
    assert cfg.watch == WatchConfig()
    assert cfg.sync == SyncConfig()
