"""Each example ships what its README promises, and its bpfsync.yaml fits its program: it
parses, names maps the object defines, and per-field policies name fields of their BTF types."""

from __future__ import annotations

from pathlib import Path

import pytest
from netlab import EXAMPLES

from bpfsync.agent.config import load_config
from bpfsync.core.policy import FieldPolicy
from bpfsync.kernel.btf import map_layouts
from bpfsync.kernel.objects import BpfObject

NAMES = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())


def test_the_examples_are_all_here() -> None:
    assert NAMES == ["blocklist", "conntrack", "dns_ratelimit"]


@pytest.mark.parametrize("example", NAMES)
def test_config_fits_the_program(example: str) -> None:
    here = EXAMPLES / example
    for f in (f"{example}.bpf.c", "README.md", "bpfsync.yaml"):
        assert (here / f).is_file(), f
    assert "bpfsync.yaml" in (here / "README.md").read_text()
    obj_path = here / f"{example}.bpf.o"
    if not obj_path.exists():
        pytest.fail(f"{obj_path} is missing: run `make bpf`")
    cfg = load_config(here / "bpfsync.yaml")
    with BpfObject.open(obj_path) as obj:
        obj.load()
        for mc in cfg.maps:
            for path in (mc.path, mc.companion):
                if path is not None:
                    assert Path(path).name in obj.maps, f"{path}: no such map in {example}"
            if isinstance(mc.policy, dict):
                with obj.map(Path(mc.path).name) as m:
                    _, layout = map_layouts(m.info)
                FieldPolicy.from_layout(layout, mc.policy)  # raises on a field it lacks
