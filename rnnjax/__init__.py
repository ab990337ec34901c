"""rnnjax: exact, fast recurrent networks with a bias-free ReLU cell, in JAX and Flax."""
