"""Layer 1, core numerics: the cell, masking, the sequential and the exact parallel recurrence,
and the hand-derived BPTT reference. Pure functions of arrays; imports nothing else of rnnjax
but ``rnnjax.core.checks``, the named checks every public function runs on its arguments."""
