"""``python -m gr_checkpoint convert --trust PATH`` (same as the ``gr-checkpoint`` console script)."""

import sys

from gr_checkpoint.convert import main

sys.exit(main())
