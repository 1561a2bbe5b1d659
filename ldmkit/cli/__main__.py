"""`python -m ldmkit.cli ...`: the ldmkit command as a script."""

import sys

from . import main

sys.exit(main())
