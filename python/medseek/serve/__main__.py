"""``python -m medseek.serve serve|ingest|query`` (the same commands as ``medseek``)."""

import sys

from .commands import main

sys.exit(main())
