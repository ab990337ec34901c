"""Layer 3, the application: the run settings table, the seed tasks, input files, run and sweep
folders, plots and the ``rnnjax`` command. Imports ``rnnjax.core`` and ``rnnjax.training``."""
