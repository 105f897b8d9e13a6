"""Entry point of every rule's `script:`: run the rule's step from the ntkcl package.

The repository root goes first on sys.path so that a rule always runs the ntkcl of
the checkout that holds this workflow, in any environment (a venv, a conda env made
by --sdm conda, a SLURM job). The steps of the summary and claims_table rules are
in ntkcl.summary, every other rule's in ntkcl.cli.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1]))  # noqa: F821

from ntkcl import cli, summary  # noqa: E402

if snakemake.rule in summary.STEPS:  # noqa: F821
    summary.run_rule(snakemake)  # noqa: F821
else:
    cli.run_rule(snakemake)  # noqa: F821
