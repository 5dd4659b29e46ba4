"""``python -m capsule.cli``."""

import sys

from capsule.cli import main

sys.exit(main())
