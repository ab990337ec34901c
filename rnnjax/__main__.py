from rnnjax.cli import script

script()
