"""2-process gloo data parallel matches one process at the same global batch."""

from __future__ import annotations

import pytest
import torch

STEPS = 2


def _train(wrist_dir, out, rank: int, world: int) -> dict:
    from medseek.models.factory import create_model
    from medseek.train.data import PairDataset
    from medseek.train.loop import Trainer
    from medseek.train.recipe import load_recipe

    # global batch 4, two micro-batches (accumulation) of 2, i.e. one pair per rank
    # CLIP: its negatives carry most of the gradient from the start (SigLIP's bias of -10
    # makes them nearly silent at init), so a missing gather would show at once
    loss = {"contrastive": "clip", "soft_labels": True, "w_region": 0.5, "w_gap": 0.1}
    cfg = load_recipe("tiny-wrist", batch_size=4, accum_steps=2, steps=STEPS, eval_every=0, save_every=0,
                      loss=loss)
    torch.manual_seed(0)
    model = create_model(cfg.model)
    train = PairDataset.from_manifest(wrist_dir, model.cfg, "train")
    tr = Trainer(cfg, model, train, out, progress=False)
    assert (tr.rank, tr.world) == (rank, world)
    for _ in range(STEPS):
        tr.train_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, wrist_dir, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        state = _train(wrist_dir, out / f"rank{rank}", rank, world)
        torch.save(state, out / f"state{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def wrist_dir(tmp_path_factory):
    from medseek.data.synth.wrist import build_synth_wrist

    out = tmp_path_factory.mktemp("synth-wrist")
    build_synth_wrist(out, n=4, seed=0, progress=False)
    return out


def test_gloo_ddp_matches_single_process(wrist_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, wrist_dir, tmp_path), nprocs=2, join=True)
    single = _train(wrist_dir, tmp_path / "single", 0, 1)
    torch.manual_seed(0)
    from medseek.models.factory import create_model

    init = create_model("wrist-tiny").state_dict()
    r0 = torch.load(tmp_path / "state0.pt")
    r1 = torch.load(tmp_path / "state1.pt")
    moved = 0
    for k, v in single.items():
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)  # ranks stay in lockstep
        if k.startswith("text.layers.") and k.endswith("key.bias"):
            # BERT's key bias adds q·b_k to every logit of a query row, which softmax
            # cancels: its true gradient is 0 and autograd returns rounding noise (~1e-9),
            # which AdamW normalises into ±lr steps. It cannot change any output.
            continue
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved += not torch.equal(v, init[k])
    assert moved > 10  # training really changed the weights
