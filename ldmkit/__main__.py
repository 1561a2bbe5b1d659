"""`python -m ldmkit ...` and `torchrun -m ldmkit ...`: runs the ldmkit command (ldmkit/cli/) as a script."""

import runpy

runpy.run_module("ldmkit.cli", run_name="__main__", alter_sys=True)
