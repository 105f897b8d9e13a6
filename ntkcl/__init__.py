"""ntkcl: how a network's empirical NTK moves when the data distribution shifts.

The package behind the Snakemake workflow of this repository. Modules, bottom up:
``config``, ``data``, ``models``, ``ntk``, ``metrics`` and ``archive`` import
nothing of ours; ``tasks``, ``reduce`` and ``inspection`` sit above them;
``train``, ``plots`` and ``claims`` above those; ``cli`` on top.
"""

__version__ = "0.1.0"
