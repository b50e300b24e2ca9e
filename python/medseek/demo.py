"""``medseek demo``: the main job, end to end, the way a deployment runs it.

1. reads real DICOM and NIfTI files (shipped in pydicom and nibabel), de-identifying
   the DICOM headers with keyed pseudonyms;
2. builds small phantom corpora (chest radiographs from real IU report labels, wrist
   radiographs with bone-region boxes, chest CT volumes in HU); the chest model is the
   trained release shipped in the package (``medseek/models/weights/chest-xr``, its
   model card gives recipe, corpus and test metrics; ``--retrain`` reproduces it from
   scratch and checks the card), the wrist and CT models are trained here with
   ``medseek train`` recipes (``demo-wrist``, ``demo-ct``); each is exported to ONNX and a
   Triton model repository — or reused from ``<out>/cache`` (keyed by sizes, seed,
   recipe, model config, weights and code);
3. runs a phantom CT through the C++ volume engine (resample -> window -> chunk) and the
   trained chunked 3D ViT, writing a PNG of its chunks;
4. per model, starts ``tritonserver`` (python backend running ONNX Runtime, CPU) and the
   gRPC retrieval server (encoder: the Triton client), ingests the corpus through the gRPC
   API, runs text->image, image->image, region-aware wrist and volume->volume queries,
   prints the ranked hits (scores, provenance pseudonyms, matched region, explaining
   concepts) and label-overlap nDCG@10 / precision@10 with bootstrap intervals on the
   held-out split, writes PNG contact sheets, and stops both servers;
5. indexes real Indiana University chest X-ray reports (read from the installed
   torchxrayvision package) in a SQLite store with a FAISS index (pretrained MiniLM joined
   with report concept vectors) and answers free-text queries, each hit explained by the
   findings it shares with the query and the sentence asserting them;
6. measures report->report retrieval (nDCG@10, MeSH label overlap) on that archive.

Everything is written under ``--out``. The wrist and CT demo models train for minutes on
a CPU: for them the point is the real path, not their accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np

INSTALL = 'pip install ".[demo]"  (from a medseek checkout; or pip install "medseek[demo]")'
# modules of the [demo] extra (= [server,triton]) that the demo needs, by distribution
DEMO_MODULES = {"grpc": "grpcio", "grpc_health": "grpcio-health-checking",
                "grpc_reflection": "grpcio-reflection", "tritonclient.grpc": "tritonclient[grpc]",
                "pytriton": "nvidia-pytriton", "onnx": "onnx", "onnxruntime": "onnxruntime",
                "prometheus_client": "prometheus-client"}

QUERIES = (
    "Large right pleural effusion with adjacent atelectasis.",
    "The heart is enlarged. Mild pulmonary vascular congestion.",
    "Calcified granuloma in the left upper lobe.",
    "No acute cardiopulmonary abnormality.",
)
IMAGE_TEXT_QUERIES = (
    "Large right pleural effusion.",
    "The heart is enlarged, consistent with cardiomegaly.",
)
VOLUME_TEXT_QUERY = "Solid nodule in the right lower lobe."
WRIST_REGION = "distal radius"
SITES = (  # site, corpus, recipe, kind
    ("chest-xr", "synth-cxr", "demo-cxr", "image"),
    ("wrist", "synth-wrist", "demo-wrist", "image"),
    ("chest-ct", "synth-ct", "demo-ct", "volume"),
)
N_STEPS = 6


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the main job end to end (Triton + gRPC)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("medseek-demo"),
                        help="output directory, also holding the build cache (default: ./medseek-demo)")
    parser.add_argument("--reports", type=int, default=400,
                        help="IU reports to index in step 5 (default 400; all 3,955 takes minutes)")
    parser.add_argument("--n-cxr", type=int, default=120,
                        help="IU reports rendered into synth-cxr (2 images each; default 120)")
    parser.add_argument("--n-wrist", type=int, default=60, help="synth-wrist studies (default 60)")
    parser.add_argument("--n-ct", type=int, default=8, help="synth-ct volumes (default 8)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every demo model (default: each recipe's)")
    parser.add_argument("--retrain", action="store_true",
                        help="reproduce the shipped models from scratch (medseek train "
                             "--release; ~20 minutes for the chest model here) and check their "
                             "test metrics against the model cards before serving them")
    parser.add_argument("-k", type=int, default=10, help="hits per query (default 10)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the corpora, training and the example queries")
    parser.set_defaults(func=run)


def check_extras() -> None:
    """Refuse to start, naming the install command, when the [demo] extra is missing."""
    import importlib.util

    missing = []
    for module, dist in DEMO_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(dist)
    if missing:
        raise SystemExit(f"medseek demo needs the server and Triton extras; missing: "
                         f"{', '.join(missing)}.\nInstall them with: {INSTALL}")


def _step(i: int, title: str) -> float:
    print(f"\n[{i}/{N_STEPS}] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"      ({time.perf_counter() - t0:.1f} s)", flush=True)


def _log(line: str) -> None:
    print(f"      {line}", flush=True)


def _indent(text: str, pad: str = "        ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def demo_io() -> None:
    import nibabel
    from pydicom.data import get_testdata_file

    from medseek.io import DeidConfig, read_image, read_nifti

    deid = DeidConfig.development()  # a public key: for demos only, never for real data
    for name in ("CT_small.dcm", "MR_small.dcm"):
        img = read_image(get_testdata_file(name), deid=deid)
        rec = img.deid
        print(f"      {name:13s} {img.modality:3s} {img.pixels.shape} {img.pixels.dtype}, "
              f"spacing {img.spacing} mm, patient pseudonym {rec.patient_pseudonym[:12]}…, "
              f"{len(rec.actions)} header elements de-identified")
    # nibabel's own example files (nibabel.testing would import pytest: read the folder)
    vol = read_nifti(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii")
    print(f"      anatomical.nii  volume {vol.array.shape} {vol.array.dtype}, "
          f"spacing (z,y,x) {tuple(round(s, 3) for s in vol.spacing)} mm")


def demo_volume(out: Path, ct) -> None:
    import torch

    from medseek import volume as mv
    from medseek.io import read_nifti

    from .demo_models import load_demo_model
    from .demo_service import split_corpus

    row = split_corpus(ct.corpus, "volume").queries[0]
    vol = read_nifti(ct.corpus / row.path)
    dual = load_demo_model(ct).eval()
    pre = dual.cfg.preprocess  # the spacing and window the model was trained with
    t0 = time.perf_counter()
    res = mv.resample(vol.array, vol.spacing, pre.target_spacing)
    win = mv.window(res, *pre.window)
    elapsed = time.perf_counter() - t0
    print(f"      {row.id}: {vol.array.shape} {vol.array.dtype} HU at "
          f"{tuple(round(s, 3) for s in vol.spacing)} mm -> {res.shape} at "
          f"{tuple(pre.target_spacing)} mm, window {pre.window[0]:.0f}/{pre.window[1]:.0f}: "
          f"{elapsed * 1e3:.1f} ms (C++)")
    py, px = dual.cfg.vision.patch_size[1:]
    pad_h, pad_w = (-win.shape[1]) % py, (-win.shape[2]) % px  # to whole patches, as in training
    win = np.ascontiguousarray(np.pad(win, ((0, 0), (0, pad_h), (0, pad_w))), dtype=np.float32)
    with torch.no_grad():
        enc = dual.encode_volume_array(win)
    weights = "the shipped release" if ct.card is not None else "the demo-trained weights"
    print(f"      chunked 3D ViT with 3D RoPE ({dual.cfg.name}, {weights}): "
          f"{len(enc.z_start)} chunks of {enc.depth} slices at absolute z "
          f"{enc.z_start.tolist()}, chunk embeddings {tuple(enc.chunks.shape)}, volume "
          f"embedding {tuple(enc.volume.shape)}")
    _write_chunk_sheet(win, enc.z_start, enc.depth, out / "volume_chunks.png")
    print(f"      wrote {out / 'volume_chunks.png'} (mid-slice of each chunk)")


def _write_chunk_sheet(win: np.ndarray, z_start: np.ndarray, depth: int, path: Path) -> None:
    from PIL import Image

    tiles = []
    for z in z_start.tolist():
        mid = min(int(z) + depth // 2, win.shape[0] - 1)
        tiles.append((np.clip(win[mid], 0, 1) * 255).astype(np.uint8))
    sheet = np.concatenate([np.pad(t, 2) for t in tiles], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, optimize=False)


def demo_models(out: Path, args, cache) -> dict:
    from .demo_models import prepare, prepare_release
    from .models.release import list_releases
    from .train.release import RELEASES

    sizes = {"synth-cxr": args.n_cxr, "synth-wrist": args.n_wrist, "synth-ct": args.n_ct}
    models = {}
    for site, corpus, recipe, _ in SITES:
        if site in list_releases():
            trained_on = RELEASES[site]["corpus"]
            skip = trained_on.get("skip")
            if skip is not None and sizes[corpus] > skip:
                _log(f"note: --n-cxr {sizes[corpus]} renders IU reports the shipped {site} "
                     f"model was trained on (reports {skip} onwards): its held-out numbers "
                     f"below are then optimistic")
            if skip is None and args.seed == trained_on["seed"]:
                _log(f"note: --seed {args.seed} renders the phantoms the shipped {site} model "
                     f"was trained on: its held-out numbers below are then optimistic")
            models[site] = prepare_release(cache, site, corpus, sizes[corpus], args.seed,
                                           args.retrain, _log)
        else:
            models[site] = prepare(cache, site, corpus, sizes[corpus], recipe, args.steps,
                                   args.seed, _log)
    for site, m in models.items():
        ev = m.metrics
        if m.card is not None:
            t = m.card["test"]
            _log(f"{site:11s} test split of its own training corpus (model card): "
                 + ", ".join(f"{k} {v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                             for k, v in t.items()))
            continue
        shown = [f"{key} {ev[key]:.3f}" for key in ("ndcg@10", "zero_shot_auroc")
                 if isinstance(ev.get(key), (int, float))]
        if shown:
            _log(f"{site:11s} validation after training (tiny val split, n={ev.get('n')}): "
                 + ", ".join(shown))
        _log(f"{site:11s} is barely trained (minutes on a CPU): expect weak rankings; the "
             "point is the real path")
    return models


def _query(site, req, title: str):
    from .demo_service import format_hits

    t0 = time.perf_counter()
    resp = site.client.search(req, timeout=300.0)
    print(f"\n      {title}  ({(time.perf_counter() - t0) * 1e3:.0f} ms round trip)")
    print(_indent(format_hits(resp)))
    return resp


def demo_site(out: Path, name: str, model, kind: str, k: int, summary: dict) -> None:
    """Start Triton + the gRPC server for one model, ingest, query, measure, stop."""
    from .demo_service import (RunningSite, heldout_metrics, image_request, ingest,
                               split_corpus)
    from .serve.contact_sheet import write_contact_sheet
    from .serve.v1 import retrieval_pb2 as pb

    split = split_corpus(model.corpus, kind)
    paths = {r.id: model.corpus / r.path for r in split.archive + split.queries}
    sheets = out / "contact_sheets"
    info = summary["sites"][name] = {"queries": {}, "hits": {}, "metrics": {}, "sheets": []}

    def sheet(resp, fname, rec=None, box_region=None):
        query = (model.corpus / rec.path).read_bytes() if rec is not None else None
        box = None
        if rec is not None and box_region is not None:
            b = next(r.box for r in rec.regions if r.name == box_region)
            box = pb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3])
        path = write_contact_sheet(resp, sheets / fname, query_image=query, paths=paths,
                                   query_name=rec.path if rec is not None else "",
                                   query_caption=f"query {rec.id}" if rec is not None else "",
                                   query_box=box)
        info["sheets"].append(str(path))
        _log(f"contact sheet {path}")

    with RunningSite(name, model.repo, out / "service" / name, kind,
                     auto_regions=(name == "wrist")) as site:
        _log(f"started {site.describe()}")
        if name == "wrist" and model.card is None:
            _log("(explaining concepts come from the server's chest finding lexicon: "
                 "for wrists they are shown, not meaningful)")
        elif name == "wrist":
            _log("(explaining concepts: the wrist model's finding head, calibrated on its "
                 "validation split; of the lexicon's findings only 'fracture' applies)")
        t0 = time.perf_counter()
        totals = ingest(site, model.corpus, split.archive, with_regions=(name == "wrist"))
        stats = site.client.stats()
        counts = ", ".join(f"{c.name} {c.items}" for c in stats.collections)
        _log(f"ingested {len(split.archive)} {kind}s through gRPC Ingest in "
             f"{time.perf_counter() - t0:.1f} s: {totals['inserted']} inserted, "
             f"{totals['duplicates']} duplicates; store holds {counts}")
        info["ingest"] = dict(totals, collections={c.name: c.items for c in stats.collections})

        def record(label, resp):
            info["queries"][label] = len(resp.hits)
            info["hits"][label] = [{"id": h.id, "score": h.score, "labels": list(h.item.labels),
                                    "concepts": [c.name for c in h.concepts]} for h in resp.hits]

        if name == "chest-xr":
            for i, text in enumerate(IMAGE_TEXT_QUERIES):
                resp = _query(site, pb.SearchRequest(text=text, k=k, collection="image"),
                              f"text -> image: {text!r}")
                record(f"text->image {i}", resp)
                if i == 0:
                    sheet(resp, "chest-xr_text_to_image.png")
        if name == "chest-ct":
            resp = _query(site, pb.SearchRequest(text=VOLUME_TEXT_QUERY, k=k,
                                                 collection="volume"),
                          f"text -> volume: {VOLUME_TEXT_QUERY!r}")
            record("text->volume", resp)
        q = split.queries[0]
        if name == "wrist":  # a held-out study with a distal radius fracture, if any
            q = next((r for r in split.queries if "distal radius fracture" in r.labels
                      and r.view == "PA"), q)
        what = "volume -> volume" if kind == "volume" else "image -> image"
        resp = _query(site, image_request(model.corpus, q, k),
                      f"{what}: held-out {q.id} ({', '.join(q.labels)})")
        record(what, resp)
        sheet(resp, f"{name}_{kind}_to_{kind}.png", q)
        if name == "wrist":
            resp = _query(site, image_request(model.corpus, q, k, WRIST_REGION),
                          f"region-aware: {q.id}, rerank by the {WRIST_REGION} box "
                          f"(WristMIR two-stage)")
            record("region rerank", resp)
            sheet(resp, "wrist_region_rerank.png", q, WRIST_REGION)
            from .demo_service import pseudonym
            from .serve.contrastive_service import demo_calibrated_step

            print("\n  -> contrastive diagnosis, distal radius fracture or none: one evidence "
                  "set per hypothesis, decided by margin, abstaining below a threshold "
                  "calibrated on the validation split", flush=True)
            # the validation images, each diagnosed with its own study left out (a tiny
            # corpus whose val split is among the queries: archive images, the same way)
            val = ([r for r in split.archive if r.split == "val"] or split.archive)[:40]
            info["contrastive"] = demo_calibrated_step(
                site.client, out / "reasoning", _log,
                calibration=[(r.id, pseudonym("study", r.study_id), r.labels) for r in val],
                queries=[(r.id, (model.corpus / r.path).read_bytes(), r.labels)
                         for r in split.queries[:40]])
        if name == "chest-xr":
            from .serve.draft_commands import demo_step as draft_step

            print(f"\n  -> report draft of held-out {q.id} (concept-grounded retrieval, "
                  f"CEMRAG): every sentence names its source report and concepts", flush=True)
            info["draft"] = draft_step(site.client, out / "reasoning", _log,
                                       image=(model.corpus / q.path).read_bytes(), name=q.id)

        # held-out metrics: every held-out item queries the archive through the API
        t0 = time.perf_counter()
        variants = [("global", None)]
        if name == "wrist":
            variants.append((f"region rerank ({WRIST_REGION})", WRIST_REGION))
        print(f"\n      held-out retrieval ({split.query_split} split vs the archive, "
              f"label-overlap relevance, 95% bootstrap CI):")
        for label, region in variants:
            resps = [site.client.search(image_request(model.corpus, r, k, region), timeout=300.0)
                     for r in split.queries]
            m = heldout_metrics(f"{name} {kind}->{kind} {label}", resps, split.queries,
                                split.archive, k)
            info["metrics"][label] = m.to_dict()
            print(f"        {m.line(k)}")
        _log(f"({time.perf_counter() - t0:.1f} s)")
        if name == "wrist":  # after the metrics: it adds a few unseen films to the archive
            from .demo_localiser import demo_step as localiser_step

            print("\n  -> regions found automatically: wrist films ingested without boxes, "
                  "and a region query that names a bone but draws no box", flush=True)
            info["auto_regions"] = localiser_step(site.client, out / "reasoning", _log)
    _log(f"stopped the gRPC server and tritonserver of {name}")


def demo_reports(out: Path, n_reports: int, cache) -> tuple[np.ndarray, int, list]:
    from medseek.data.iu import load_iu_reports
    from medseek.index import Catalog, CatalogConfig, ItemRecord, Store, StoreConfig
    from medseek.models.text_tower import TextEncoder
    from medseek.search import SearchConfig, SearchPipeline
    from medseek.search.explain import explain
    from medseek.text.concepts import hybrid_embedding, lateral_concept_names, lateral_report_concepts

    reports = [r for r in load_iu_reports() if r.text.strip()][:n_reports]
    texts = [r.text for r in reports]
    encoder = TextEncoder()
    t0 = time.perf_counter()
    text_emb = cached_report_embeddings(cache, encoder, texts)
    state = "reused from the cache" if cache.hits[-1:] == ["iu-embeddings"] else "embedded"
    print(f"      {state}: {len(texts)} real IU reports, pretrained MiniLM-L6 "
          f"({time.perf_counter() - t0:.1f} s)")
    # the server's report ranker (medseek.serve.report_ranker): MiniLM joined with the
    # laterality-aware finding concepts
    concepts = lateral_report_concepts(texts)
    emb = hybrid_embedding(text_emb, concepts)
    names = lateral_concept_names()

    store_dir = out / "archive"
    if store_dir.exists():
        shutil.rmtree(store_dir)
    store_dir.mkdir(parents=True)
    store = Store(StoreConfig(store_dir / "medseek.sqlite"))
    items = [
        ItemRecord(
            id=r.uid, collection="report", modality="report", body_part="chest",
            labels=tuple(names[i] for i in np.flatnonzero(c)),
            # IU ids are public ids; they still pass through a hash like any patient id
            patient_pseudonym=hashlib.sha256(r.uid.encode()).hexdigest()[:16],
            source_document=r.uid,
            content_sha256=hashlib.sha256(t.encode()).hexdigest(),
        )
        for r, t, c in zip(reports, texts, concepts)
    ]
    results = store.upsert(items, emb)
    kept = [i for i, r in enumerate(results) if r.status != "duplicate"]
    print(f"      stored {len(kept)} reports in {store.config.path} "
          f"({len(items) - len(kept)} verbatim duplicates folded)")
    catalog = Catalog(store, CatalogConfig(store_dir / "indexes"))
    catalog.open()
    catalog.save()
    with SearchPipeline(catalog, store, SearchConfig(k_prime=50, k=3)) as pipeline:
        q_text = encoder.encode(list(QUERIES))
        q_concepts = lateral_report_concepts(list(QUERIES))
        q_emb = hybrid_embedding(q_text, q_concepts)
        by_id = {r.uid: (r, c) for r, c in zip(reports, concepts)}
        for query, qe, qc in zip(QUERIES, q_emb, q_concepts):
            result = pipeline.search("report", qe, k=3)
            print(f"\n      query: {query!r}   ({result.timings['total'] * 1e3:.1f} ms, "
                  "top 50 diversified by MMR, one hit per patient)")
            hit_concepts = np.stack([by_id[h.id][1] for h in result.hits])
            why = explain(qc, hit_concepts, names)
            for rank, (hit, shared) in enumerate(zip(result.hits, why), 1):
                report = by_id[hit.id][0]
                mesh = "; ".join(report.mesh_major[:3])
                reason = ", ".join(m.concept for m in shared) or "sentence similarity only"
                print(f"        {rank}. {hit.id:8s} score {hit.score:.3f}  shared: {reason}")
                print(f"           MeSH: {mesh}")
                print(f"           \"{_clip(_evidence_sentence(report, shared), 110)}\"")
    store.close()
    return emb, text_emb.shape[1], reports


def cached_report_embeddings(cache, encoder, texts: list[str]) -> np.ndarray:
    """MiniLM embeddings of ``texts``, cached under the hash of the texts and the encoder
    code (the cache holds vectors only, never report text)."""
    from .demo_models import source_hash

    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    spec = {"texts": digest, "n": len(texts), "code": source_hash("models/text_tower.py")}
    folder = cache.get("iu-embeddings", spec, lambda d: np.save(
        d / "embeddings.npy", encoder.encode(texts, batch_size=32)))
    return np.load(folder / "embeddings.npy")


def _evidence_sentence(report, shared) -> str:
    """The report sentence that asserts the strongest shared concept (else the impression)."""
    from medseek.text.evidence import extract_evidence

    for m in shared:  # a concept is a finding, or "<side> <finding>"
        side, _, rest = m.concept.partition(" ")
        finding, side = (rest, side) if side in ("left", "right") and rest else (m.concept, None)
        for ev in extract_evidence(report.text):
            if (ev.finding == finding and ev.positive
                    and (side is None or ev.laterality in (side, "bilateral"))):
                return ev.sentence
    return report.impression or report.findings


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def demo_eval(emb: np.ndarray, text_dim: int, reports: list) -> dict:
    from medseek.data.iu import mesh_heading_matrix
    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k

    _, labels = mesh_heading_matrix(reports)
    relevance = label_overlap_relevance(labels, labels, mode="jaccard")
    results = {}
    for name, vecs in (("MiniLM only", emb[:, :text_dim]), ("MiniLM + side-aware concepts", emb)):
        v = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        scores = (v @ v.T).astype(np.float64)
        np.fill_diagonal(scores, -np.inf)
        mean, lo, hi = bootstrap_ci(ndcg_at_k(scores, relevance, 10), n_boot=300, seed=0)
        print(f"      {name:18s} nDCG@10 {mean:.3f} [{lo:.3f}, {hi:.3f}]")
        results[name] = [mean, lo, hi]
    return results


def run(args: argparse.Namespace) -> int:
    if args.reports < 20:
        raise SystemExit(f"medseek demo: --reports must be >= 20, got {args.reports}")
    for name in ("n_cxr", "n_wrist", "n_ct"):
        if getattr(args, name) < 4:
            raise SystemExit(f"medseek demo: --{name.replace('_', '-')} must be >= 4, "
                             f"got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"medseek demo: --steps must be >= 1, got {args.steps}")
    if not 1 <= args.k <= 100:
        raise SystemExit(f"medseek demo: -k must be in [1, 100], got {args.k}")
    check_extras()
    # SIGTERM unwinds like Ctrl-C, so every server started below is stopped on the way out
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(args)
    except KeyboardInterrupt:  # every server was stopped on the way out
        print("\nmedseek demo: interrupted; tritonserver and the gRPC servers are stopped",
              flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(args: argparse.Namespace) -> int:
    from .demo_models import Cache

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "cache")
    summary: dict = {"sites": {}, "steps_s": {}}
    t_all = time.perf_counter()

    def timed(i, title, fn, *a):
        t0 = _step(i, title)
        result = fn(*a)
        summary["steps_s"][str(i)] = round(time.perf_counter() - t0, 2)
        _done(t0)
        return result

    timed(1, "Medical image I/O: real DICOM and NIfTI, de-identified at read time", demo_io)
    models = timed(2, "Corpora, training and export (medseek train, medseek.export; cached "
                      f"under {cache.root})", demo_models, out, args, cache)
    timed(3, "Volume engine: phantom CT (NIfTI) -> resample -> window -> chunk -> chunked "
             "3D ViT", demo_volume, out, models["chest-ct"])
    t0 = _step(4, "The service: tritonserver + gRPC retrieval server per model; ingest, "
                  "query and measure through the gRPC API")
    for site, _, _, kind in SITES:
        print(f"\n    -- {site} --", flush=True)
        demo_site(out, site, models[site], kind, args.k, summary)
    summary["steps_s"]["4"] = round(time.perf_counter() - t0, 2)
    _done(t0)
    emb, text_dim, reports = timed(5, "Report archive (in process): SQLite store + FAISS "
                                      "index, free-text queries", demo_reports, out,
                                   args.reports, cache)
    t0 = _step(6, f"Report->report retrieval on the {len(reports)} archived reports "
                  "(relevance: MeSH label Jaccard)")
    summary["reports"] = demo_eval(emb, text_dim, reports)
    summary["steps_s"]["6"] = round(time.perf_counter() - t0, 2)
    _done(t0)
    summary["cache"] = {"hits": cache.hits, "misses": cache.misses}
    summary["total_s"] = round(time.perf_counter() - t_all, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nDone in {summary['total_s']:.0f} s; outputs in {out}/ (summary.json, "
          f"contact_sheets/, service/*/triton.log); cache: {len(cache.hits)} reused, "
          f"{len(cache.misses)} built")
    shipped = [site for site, m in models.items() if m.card is not None]
    trained = [site for site in models if site not in shipped]
    if shipped:
        print(f"Shipped trained releases: {', '.join(shipped)} (their model cards and "
              "benchmarks/RESULTS.md give their test metrics).")
    if trained:
        print(f"Barely trained here (minutes on a CPU): {', '.join(trained)}; their rankings "
              "show the path works, not what trained models reach.")
    return 0
