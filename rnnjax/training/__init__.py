"""Layer 2, training: the seed models, batches, ``fit`` and its stop rules, seed sweeps, recipes,
devices and checkpoints. Imports ``rnnjax.core`` only."""
