"""ntkcl: how a network's empirical NTK moves when the data distribution shifts.

The package behind the Snakemake workflow of this repository. Modules, bottom up:
``config``, ``data``, ``models``, ``ntk``, ``metrics`` and ``archive`` import
nothing of ours; ``tasks``, ``reduce`` (which reads task classes from ``tasks``)
and ``inspection`` sit above them; ``train``, ``plots`` and ``claims`` above those;
``summary`` (switch-summary figure, combined claims table) and ``cli`` on top.
"""

__version__ = "0.1.0"
