"""Training: the library behind ``medseek train`` (the driver is :mod:`.commands`).

=====================  ==========================================================
module                 owns
=====================  ==========================================================
:mod:`.losses`         CLIP / SigLIP / soft-label CLIP (PRIMA), region ↔ caption
                       (WristMIR), chunk-wise organ ↔ sentence (SigVLP), the
                       modality-gap term; ``encode_batch`` + ``combine_losses``
:mod:`.optim`          Muon (``kernels.newton_schulz``) for matrices + AdamW;
                       ``build_optimizer(model, OptimConfig) -> (opt, split report)``
:mod:`.curation`       CheXficient-style ``select_curated`` / ``select_random``
:mod:`.data`           ``PairDataset`` from a manifest, ``collate`` (tokenises)
:mod:`.loop`           ``Trainer`` (seeded stream, accumulation, bf16 on CUDA,
                       gloo/NCCL data parallel, JSONL metrics, eval hook)
:mod:`.checkpoint`     safetensors checkpoints with exact resume
:mod:`.recipe`         ``TrainConfig`` and the JSON recipes in ``recipes/``
:mod:`.text_features`  freezing the text tower; ``TextFeatureCache`` of a frozen
                       tower's features (one MiniLM forward per text per run)
:mod:`.ablation`       the issue-5 ablation table (``benchmarks/ablation.py``):
                       variants from one seed, test-split metrics with CIs
=====================  ==========================================================

Submodules are imported on use; importing this package costs nothing.
"""
