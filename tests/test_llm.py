"""Templates, soft prompt, verbalizer and the LLM scorer on tiny random T5 and Llama models."""

import numpy as np
import pytest
import torch

from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import MASK, Templates, lsr_prompt, rps_prompt, ta_prompt
from delrec.llm.verbalizer import Verbalizer
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone

TITLES = ["Toy Story (1995)", "Heat (1995)", "Fargo", "Alien", "Casablanca", "Titanic", "The Matrix", "Jaws (1995)",
          "Vertigo", "Psycho", "Rocky", "The Usual Suspects (1995)", "Toy", "Heat", "Story"]
BACKBONES = {"t5": tiny_t5_backbone, "llama": tiny_llama_backbone}


# -- templates -----------------------------------------------------------------------------

def test_lsr_prompt_has_instruction_slot_history_candidates():
    p = lsr_prompt(Templates(), ["Heat (1995)", "Fargo"], TITLES, label="Alien")
    assert p.has_slot and "SASRec" in p.before
    assert '"Heat (1995)", "Fargo"' in p.after  # most recent last
    assert all(f'"{t}"' in p.after for t in TITLES)
    assert p.after.rstrip().endswith("Answer:") and p.label == "Alien"


def test_ablation_prompts():
    plain = lsr_prompt(Templates(), ["Heat"], TITLES, soft_prompt=False)
    assert not plain.has_slot and "SASRec" not in plain.text  # w/o SP: no instruction to refer to it
    card = lsr_prompt(Templates(), ["Heat"], TITLES, model_card=True)
    assert not card.has_slot and "self-attentive" in card.text


def test_templates_are_configurable(tmp_path):
    f = tmp_path / "games.json"
    f.write_text('{"item": "game", "items": "games", "verb": "played", "verb_base": "play"}')
    t = Templates.from_file(f, teacher="GRU4Rec")
    p = lsr_prompt(t, ["Heat"], TITLES)
    assert "played these games" in p.after and "GRU4Rec" in p.before
    f.write_text('{"colour": "blue"}')
    with pytest.raises(ValueError, match="colour"):
        Templates.from_file(f)


def test_ta_prompt_masks_the_most_recent_item():
    seq = ["Alien", "Fargo", "Heat", "Rocky", "Jaws (1995)", "Vertigo", "Psycho"]  # Psycho came after Vertigo
    cands = ["Vertigo", "Titanic", "Heat"]
    p = ta_prompt(Templates(), seq, cands, num_examples=4)
    assert p.label == "Vertigo"
    text = p.after
    # four in-context examples from the user's own sequence, the most recent last
    assert text.count("After ") == 4
    assert 'After "Alien", "Fargo", the user watched "Heat"' in text
    assert 'After "Alien", "Fargo", "Heat", "Rocky", the user watched "Jaws (1995)"' in text
    assert f'"Jaws (1995)", {MASK}, and next watched "Psycho"' in text
    assert '"Vertigo",' not in text.split("Candidates:")[0]  # the label is not given away


def test_rps_prompt_label_is_teacher_top1():
    top = ["Heat", "Alien", "Fargo", "Rocky"]
    p = rps_prompt(Templates(), ["Titanic"], top, np.random.default_rng(0))
    assert p.label == "Heat" and sorted(p.candidates) == sorted(top)
    orders = {rps_prompt(Templates(), ["Titanic"], top, np.random.default_rng(s)).candidates[0] for s in range(20)}
    assert len(orders) > 1  # shown shuffled, not ranked


def test_prompt_errors():
    with pytest.raises(ValueError, match="empty"):
        lsr_prompt(Templates(), [], TITLES)
    with pytest.raises(ValueError, match="not among the candidates"):
        lsr_prompt(Templates(), ["Heat"], TITLES[:3], label="Rocky")


# -- soft prompt ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BACKBONES)
def test_soft_prompt_lands_exactly_at_the_slot(kind):
    bb = BACKBONES[kind]()
    sp = SoftPrompt.for_backbone(bb, num_tokens=5, seed=0)
    v = Verbalizer(bb)
    p = lsr_prompt(Templates(), ["Heat"], TITLES)
    embeds = v._prompt_embeds(p, sp)
    n_before = len(bb.encode_text(p.before)) + (1 if getattr(bb.tokenizer, "add_bos_token", False) else 0)
    assert torch.equal(embeds[n_before : n_before + 5], sp.embedding.to(embeds.dtype))
    # the tokens around the slot are the template's own
    assert torch.equal(embeds[:n_before], bb.input_embeddings(torch.tensor(bb.encode_text(p.before))))


def test_soft_prompt_init_scale_and_save_load(tmp_path):
    bb = tiny_llama_backbone()
    sp = SoftPrompt.for_backbone(bb, num_tokens=50, seed=1)
    assert sp.embedding.std().item() == pytest.approx(bb.embedding_std(), rel=0.2)
    path = sp.save(tmp_path / "sp")
    again = SoftPrompt.load(path, bb)
    assert torch.equal(again.embedding, sp.embedding) and again.backbone == sp.backbone
    v = Verbalizer(bb)
    p = [lsr_prompt(Templates(), ["Heat"], TITLES)]
    assert torch.equal(v.score(p, sp)[0], v.score(p, again)[0])
    assert not list(tmp_path.glob("sp/*.tmp"))


def test_soft_prompt_refuses_another_backbone(tmp_path):
    path = SoftPrompt.for_backbone(tiny_llama_backbone(), 4).save(tmp_path / "sp")
    with pytest.raises(ValueError, match="tiny-llama"):
        SoftPrompt.load(path, tiny_t5_backbone())
    other = SoftPrompt(4, 48, backbone="something")
    other.save(tmp_path / "wide")
    with pytest.raises(ValueError, match="dimension"):
        SoftPrompt.load(tmp_path / "wide", tiny_llama_backbone())
    with pytest.raises(FileNotFoundError):
        SoftPrompt.load(tmp_path / "nothing")


# -- verbalizer ----------------------------------------------------------------------------

def _prompts():
    t = Templates()
    ps = [lsr_prompt(t, TITLES[i : i + 1 + i % 4], TITLES[i:] + TITLES[:i]) for i in range(6)]
    ps.append(lsr_prompt(t, ["Heat"], TITLES, soft_prompt=False))  # a prompt without a slot in the batch
    return ps


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("method", ["full-title", "first-token"])
@pytest.mark.parametrize("passes", ["batch", "prompt"])
def test_fast_verbalizer_equals_brute_force(kind, method, passes):
    bb = BACKBONES[kind]()
    sp = SoftPrompt.for_backbone(bb, 7, seed=0)
    v = Verbalizer(bb, method, batch_size=3, passes=passes)  # batches of mixed prompt lengths
    prompts = _prompts()
    fast, ref = v.score(prompts, sp), v.score_brute_force(prompts, sp)
    for a, b in zip(fast, ref):
        assert a.shape == (len(TITLES),)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_first_token_ties_titles_sharing_a_first_token():
    bb = tiny_llama_backbone()
    p = [lsr_prompt(Templates(), ["Heat"], TITLES, soft_prompt=False)]
    first = Verbalizer(bb, "first-token").score(p)[0]
    full = Verbalizer(bb, "full-title").score(p)[0]
    toy, toy_story = TITLES.index("Toy"), TITLES.index("Toy Story (1995)")
    assert first[toy] == first[toy_story]
    assert full[toy] != full[toy_story]


def test_batch_size_does_not_change_scores():
    bb = tiny_llama_backbone()
    sp = SoftPrompt.for_backbone(bb, 3, seed=0)
    a = Verbalizer(bb, batch_size=1, passes="batch").score(_prompts(), sp)
    b = Verbalizer(bb, batch_size=7, passes="batch").score(_prompts(), sp)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_do_not_depend_on_the_batch_on_cpu(kind, dtype):
    """On CPU (passes="auto") each prompt has its own forward pass: its scores, and so every rank,
    are bit-identical whatever the batch size, the order of the prompts and the prompts beside it,
    in bfloat16 too (padded batches are not: rounding depends on the padded shape)."""
    bb = BACKBONES[kind]()
    bb.model.to(dtype)
    sp = SoftPrompt.for_backbone(bb, 3, seed=0)
    prompts = _prompts()
    assert Verbalizer(bb).one_pass_per_prompt
    reference = Verbalizer(bb, batch_size=1).score(prompts, sp)
    for batch_size in (2, 3, 7):
        for x, y in zip(reference, Verbalizer(bb, batch_size=batch_size).score(prompts, sp)):
            assert torch.equal(x, y)
    order = [5, 0, 6, 2, 4, 1, 3]
    shuffled = Verbalizer(bb, batch_size=4).score([prompts[i] for i in order], sp)
    for i, y in zip(order, shuffled):
        assert torch.equal(reference[i], y)
    alone = Verbalizer(bb, batch_size=8).score([prompts[2]], sp)[0]  # without the other prompts
    assert torch.equal(reference[2], alone)


def test_slot_without_soft_prompt_is_an_error():
    with pytest.raises(ValueError, match="no soft prompt"):
        Verbalizer(tiny_llama_backbone()).score([lsr_prompt(Templates(), ["Heat"], TITLES)])


def test_gradients_reach_only_the_soft_prompt():
    bb = tiny_llama_backbone().freeze()
    sp = SoftPrompt.for_backbone(bb, 4, seed=0)
    v = Verbalizer(bb)
    p = lsr_prompt(Templates(), ["Heat"], TITLES, label="Alien")
    logp = v.sequence_logprobs([p], [[v.answer_ids(p.label)]], sp)[0]
    (-logp.sum()).backward()
    assert sp.embedding.grad is not None and sp.embedding.grad.abs().sum() > 0
    assert all(w.grad is None for w in bb.model.parameters())


@pytest.mark.parametrize("kind", BACKBONES)
def test_training_objectives_match_the_reference_scores(kind):
    """`candidates` is the cross-entropy over the brute-force scores of the candidates; `label`
    the mean negative log-likelihood of the label titles."""
    bb = BACKBONES[kind]()
    sp = SoftPrompt.for_backbone(bb, 5, seed=0)
    v = Verbalizer(bb, batch_size=4)
    t = Templates()
    prompts = [lsr_prompt(t, TITLES[i : i + 2], TITLES, label=TITLES[(3 * i + 1) % len(TITLES)]) for i in range(3)]
    ref = v.score_brute_force(prompts, sp)
    labels = [p.candidates.index(p.label) for p in prompts]
    expect_ce = np.mean([-torch.log_softmax(s, 0)[y].item() for s, y in zip(ref, labels)])
    expect_nll = np.mean([-s[y].item() for s, y in zip(ref, labels)])
    assert v.loss(prompts, sp, "candidates").item() == pytest.approx(expect_ce, abs=1e-4)
    assert v.loss(prompts, sp, "label").item() == pytest.approx(expect_nll, abs=1e-4)
    with pytest.raises(ValueError, match="objective"):
        v.loss(prompts, sp, "mse")
    with pytest.raises(ValueError, match="no label"):
        v.loss([lsr_prompt(t, ["Heat"], TITLES)], sp)
