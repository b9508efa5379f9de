"""Shared fixtures: small synthetic data sets made in the test, never downloaded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from delrec.data.protocol import ProtocolConfig, prepare
from delrec.data.store import RunData, write

# The test models are tiny: one thread is faster than two, and on a shared machine two OpenMP
# threads per process made single tests 100x slower (measured: 65 s -> 0.5 s for the T5 check).
torch.set_num_threads(1)


def sequential_rule_dataset(num_users: int = 120, num_items: int = 60, length: int = 25, seed: int = 0):
    """Every user walks the catalogue in order: item i is always followed by item i+1 (cyclic),
    from a random start. Timestamps interleave users so every split holds every user."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        start = int(rng.integers(num_items))
        for t in range(length):
            rows.append((f"u{u}", f"i{(start + t) % num_items}", 1_000_000 + t * 1000 + u))
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    interactions = interactions.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order is arbitrary
    items = pd.DataFrame({"item": [f"i{i}" for i in range(num_items)], "title": [f"Movie {i} ({1990 + i})" for i in range(num_items)]})
    return interactions, items


def random_dataset(num_users: int = 80, num_items: int = 60, seed: int = 1):
    """Random tastes, variable lengths, many equal timestamps (to exercise ties)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        n = int(rng.integers(5, 40))
        items = rng.choice(num_items, size=n, replace=False)
        times = np.sort(rng.integers(0, 300, size=n))  # coarse clock: frequent ties
        rows += [(f"u{u}", f"i{i}", int(t)) for i, t in zip(items, times)]
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    interactions = interactions.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    items = pd.DataFrame({"item": [f"i{i}" for i in range(num_items)], "title": [f"Film {i}" for i in range(num_items)]})
    return interactions, items


def write_pipeline_inputs(root, backbone, config_name: str = "quick.yaml", **dataset_kwargs):
    """The inputs of a tiny `delrec run`: a dataset folder (interactions.csv + items.csv of
    sequential_rule_dataset(**dataset_kwargs)), `backbone` saved as a model folder, and a config
    naming both and a SASRec teacher. Returns the config's path."""
    interactions, items = sequential_rule_dataset(**dataset_kwargs)
    (root / "data").mkdir()
    interactions.to_csv(root / "data" / "interactions.csv", index=False)
    items.to_csv(root / "data" / "items.csv", index=False)
    backbone.model.save_pretrained(root / "llm")
    backbone.tokenizer.save_pretrained(root / "llm")
    config = root / config_name
    config.write_text(f"dataset: {root / 'data'}\nllm: {root / 'llm'}\nteachers: [sasrec]\n")
    return config


def make_run(tmp_path, dataset=sequential_rule_dataset, protocol: str = "paper", **kwargs):
    interactions, items = dataset(**kwargs)
    prepared = prepare(interactions, items, ProtocolConfig.for_protocol(protocol))
    write(prepared, tmp_path / "data")
    return tmp_path, RunData.load(tmp_path / "data")


@pytest.fixture
def rule_run(tmp_path):
    return make_run(tmp_path)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A tiny Llama saved as a model folder (what an `llm` setting names), once per test module."""
    from llm_helpers import tiny_llama_backbone

    folder = tmp_path_factory.mktemp("llm")
    bb = tiny_llama_backbone()
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return str(folder)


def kill_teacher_training_at_epoch(monkeypatch, epoch: int) -> None:
    """A simulated kill: the valid evaluation after `epoch` raises KeyboardInterrupt (the
    checkpoint of the epoch before it is on disk); `monkeypatch.undo()` lets training run again."""
    from delrec.training import teacher as train_mod

    real, calls = train_mod._valid_score, {"n": 0}

    def valid_score(*args):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    monkeypatch.setattr(train_mod, "_valid_score", valid_score)


@pytest.fixture(scope="module")
def csv_llm_run(tmp_path_factory):
    """(run folder, tiny LLM folder): a run prepared from CSV files (titles as MovieLens writes them), with a GRU4Rec teacher
    and a tiny LLM saved beside it (the Python API's and the HTTP service's tests)."""
    from delrec.cli import main
    from llm_helpers import tiny_llama_backbone

    root = tmp_path_factory.mktemp("csv-llm-run")
    interactions, items = sequential_rule_dataset(num_users=60, num_items=40, length=20)
    items.loc[0, "title"] = "Usual Suspects, The (1995)"
    (root / "data").mkdir()
    interactions.to_csv(root / "data" / "interactions.csv", index=False)
    items.to_csv(root / "data" / "items.csv", index=False)
    assert main(["data", "prepare", str(root / "data"), "--out", str(root / "run")]) == 0
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(root / "run"), "--epochs", "2", "--quiet",
                 "--set", "lr=0.1"]) == 0
    bb = tiny_llama_backbone()
    bb.model.save_pretrained(root / "llm")
    bb.tokenizer.save_pretrained(root / "llm")
    return root / "run", str(root / "llm")
