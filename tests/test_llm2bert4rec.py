"""LLM2BERT4Rec (delrec.teachers.bert4rec, delrec.llm.item_init): BERT4Rec whose item embeddings
start from the LLM's title embeddings reduced by PCA; it learns on tiny data like the others and
its start depends on the titles alone, never on a later split."""

import json

import numpy as np
import pytest
import torch

from conftest import make_run
from delrec.llm.backbone import Backbone
from delrec.llm.item_init import INIT_STD, pca_title_embeddings
from delrec.llm.similarity import TitleSimilarityScorer
from delrec.teachers import default_config
from delrec.training.teacher import TeacherStage, train_teacher


def test_the_item_embeddings_start_from_the_pca_of_the_title_embeddings(tmp_path, llm):
    run, data = make_run(tmp_path)
    reduced = pca_title_embeddings(data, llm, 8)
    assert reduced.shape == (data.num_items, 8) and reduced.std().item() == pytest.approx(INIT_STD, rel=1e-4)
    # the reduction keeps the titles' geometry: PCA components are uncorrelated, by decreasing variance
    cov = np.cov(reduced.double().numpy().T)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-6 * np.abs(cov).max() and (np.diff(np.diag(cov)) <= 1e-12).all()
    full = TitleSimilarityScorer.for_run(data, Backbone.load(llm, device="cpu", dtype="float32"), progress=False)
    embeddings = full.item_embeddings(np.arange(1, data.num_items + 1)).double()
    projected = (embeddings - embeddings.mean(0)) @ torch.linalg.lstsq(embeddings - embeddings.mean(0), reduced.double()).solution
    assert torch.allclose(projected, reduced.double(), atol=1e-6)  # a linear map of the centred embeddings
    stage = TeacherStage(run, default_config("llm2bert4rec", dim=8, num_heads=2, llm=llm), torch.device("cpu"), 10)
    assert torch.equal(stage.model.item_embedding.weight[1 : data.num_items + 1].detach(), reduced)
    plain = TeacherStage(run, default_config("bert4rec", dim=8, num_heads=2), torch.device("cpu"), 10)
    assert not torch.equal(plain.model.item_embedding.weight[1 : data.num_items + 1].detach(), reduced)
    with pytest.raises(ValueError, match="needs at least"):
        pca_title_embeddings(data, llm, data.num_items + 1)


def test_llm2bert4rec_learns_the_rule_and_reads_no_later_split(tmp_path, llm):
    run, data = make_run(tmp_path)
    result = train_teacher(run, default_config("llm2bert4rec", dim=16, max_epochs=15, lr=5e-3, patience=100, llm=llm),
                           device="cpu", progress=False)
    assert result.metrics["test"]["candidates"]["HR@1"] >= 0.9, result.metrics["test"]
    saved = json.loads((run / "teachers" / "llm2bert4rec" / "config.json").read_text())
    assert saved["teacher"]["llm"] == llm and saved["teacher"]["model"] == "llm2bert4rec"
    # its start reads titles only: scrambling every test target changes nothing before training
    data.target[data.indices("test")] = np.roll(data.target[data.indices("test")], 1)
    assert torch.equal(pca_title_embeddings(data, llm, 16), pca_title_embeddings(make_run(tmp_path / "b")[1], llm, 16))


def test_delrec_run_gives_llm2bert4rec_the_runs_llm(tmp_path, monkeypatch):
    from delrec import pipeline as pipeline_mod
    from delrec.config import PipelineConfig

    trained = []
    monkeypatch.setattr(pipeline_mod, "train_teacher", lambda run, tc, **kwargs: trained.append(tc))
    config = PipelineConfig(run_dir=str(tmp_path), teachers=["sasrec", "llm2bert4rec"], llm="my-llm", methods=["delrec"])
    pipeline_mod.Pipeline(config, progress=False).teachers()
    assert [(c.model, c.llm) for c in trained] == [("sasrec", None), ("llm2bert4rec", "my-llm")]
