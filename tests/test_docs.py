"""The repository stands alone and its documents follow the code: no path outside the checkout,
every config directive in docs/CONTRACT.md, a demo model of every model type served by
conf/srv.conf."""

from __future__ import annotations

import re
from pathlib import Path

from models.catalog import MODEL_TYPES
from server.config import load_config
from tests.conftest import REPO

TEXT_SUFFIXES = {".md", ".py", ".conf", ".toml", ".yaml", ".yml", ".cfg", ".sh", ".service", ".txt", ".json"}
SKIP_DIRS = {".git", ".venv", ".venv-bench", "__pycache__", ".pytest_cache", ".ruff_cache", "store", "run", "logs"}


def repo_text_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*"):
        if any(part in SKIP_DIRS for part in path.relative_to(REPO).parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("Makefile", "Dockerfile", "modelsrv")):
            files.append(path)
    return files


def test_nothing_refers_outside_the_repository():
    shared = "shared"  # spelled apart so that this file does not match itself
    outside = re.compile(r"\.\./" + shared + "|/work/" + shared)
    bad = [f"{p.relative_to(REPO)}:{n}" for p in repo_text_files()
           for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not bad, f"paths outside the repository: {bad}"


def test_contract_lists_every_directive_and_model_type():
    contract = (REPO / "docs" / "CONTRACT.md").read_text()
    source = (REPO / "server" / "config.py").read_text()
    directives = set(re.findall(r'(?:d|inner)\.name == "(\w+)"', source))
    assert {"worker_processes", "listen", "tensor_parallel", "keepalive_timeout"} <= directives
    for name in directives:
        assert f"`{name}" in contract, f"docs/CONTRACT.md does not describe the directive {name}"
    for model_type in MODEL_TYPES:
        assert f"| `{model_type}` |" in contract, f"docs/CONTRACT.md has no row for model_type {model_type}"


def test_demo_serves_every_model_type(tmp_path):
    from models.demo import main as demo_main

    assert demo_main([str(tmp_path / "store")]) == 0
    conf = tmp_path / "conf" / "srv.conf"
    conf.parent.mkdir()
    conf.write_text((REPO / "conf" / "srv.conf").read_text().replace("models/store/", f"{tmp_path}/store/"))
    cfg = load_config(conf)  # what bin/modelsrv -t checks, model folders included
    assert {m.model_type for m in cfg.models.values()} == set(MODEL_TYPES)
    assert "bloom_demo" in cfg.models and (cfg.models["bloom_demo"].path / "tokenizer.json").is_file()
