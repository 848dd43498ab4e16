"""docs/config.md is what the config models generate, every field is described, `run`'s flags are
all in the reference, and the examples set every field and load: examples/bpfsync.full.yaml all
but the nats section (transport: nats excludes the mesh's peers and tls), examples/bpfsync.nats.yaml
every field of that section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from bpfsync.agent.config import (
    NATS_CREDENTIALS,
    SyncConfig,
    WatchConfig,
    load_config,
    parse_config,
)
from bpfsync.cli import reference
from bpfsync.cli.main import RUN_FLAGS, app

ROOT = Path(__file__).resolve().parents[2]
CONFIG_MD = ROOT / "docs" / "config.md"
FULL_EXAMPLE = ROOT / "examples" / "bpfsync.full.yaml"
NATS_EXAMPLE = ROOT / "examples" / "bpfsync.nats.yaml"
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


def _nats_paths() -> set[str]:
    return {path for path, _ in reference.fields() if path.split(".")[0] == "nats"}


def test_the_full_example_sets_every_field_but_nats_and_loads() -> None:
    cfg = load_config(FULL_EXAMPLE)
    data = yaml.safe_load(FULL_EXAMPLE.read_text())
    missing = {path for path, _ in reference.fields()} - _paths(data) - _nats_paths()
    assert not missing, f"examples/bpfsync.full.yaml lacks {sorted(missing)}"
    # its comments say these are the defaults: keep them so
    assert cfg.watch == WatchConfig()
    assert cfg.sync == SyncConfig()


_CREDENTIALS = {f for kind in NATS_CREDENTIALS for f in kind}


def _commented_credentials(text: str) -> dict[str, Any]:
    """The credential fields the NATS example shows as commented lines ``  # FIELD: VALUE``:
    the kinds exclude each other, so the file sets one and shows the others."""
    shown: dict[str, Any] = {}
    for line in text.splitlines():
        found = re.fullmatch(r"  # (\w+): (.*)", line)
        if found and found.group(1) in _CREDENTIALS:
            shown.update(yaml.safe_load(f"{found.group(1)}: {found.group(2)}"))
    return shown


def test_the_nats_example_sets_every_nats_field_and_loads_with_each_kind_of_credentials(
) -> None:
    text = NATS_EXAMPLE.read_text()
    assert load_config(NATS_EXAMPLE).transport == "nats"
    data = yaml.safe_load(text)
    shown = _commented_credentials(text)
    assert not set(shown) & set(data["nats"]), "a credential field is both set and shown"
    missing = _nats_paths() - _paths(data) - {f"nats.{f}" for f in shown}
    assert not missing, f"examples/bpfsync.nats.yaml lacks {sorted(missing)}"
    # each kind of credentials, in place of the one the file sets, loads
    given = {**data["nats"], **shown}
    rest = {k: v for k, v in data["nats"].items() if k not in _CREDENTIALS}
    for kind in NATS_CREDENTIALS:
        variant = {**data, "nats": {**rest, **{f: given[f] for f in kind}}}
        cfg = parse_config(variant, f"{NATS_EXAMPLE.name} with {'/'.join(kind)}")
        assert cfg.nats is not None and getattr(cfg.nats, kind[0]) is not None
