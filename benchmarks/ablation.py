"""Issue-5 training ablation table: every variant trained from one seed on one corpus,
evaluated on its patient-disjoint test split with bootstrap CIs.

    python benchmarks/ablation.py --task image --recipe tiny-cxr --data CORPUS --out runs/ablation/cxr
    python benchmarks/ablation.py --task volume --recipe tiny-ct --data CT_CORPUS --out runs/ablation/ct
    python benchmarks/ablation.py --task image ... --only siglip   # one row; the table is rebuilt

See :mod:`medseek.train.ablation` for the rows and metrics.
"""

import sys

from medseek.train.ablation import main

if __name__ == "__main__":
    sys.exit(main())
