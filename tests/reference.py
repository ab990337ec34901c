"""Float64 NumPy reference: each sequence run alone, one Python step at a time."""

import numpy as np


def numpy_rnn(w_ih, w_hh, xs, lengths, initial_state=None):
    """Returns ``(final_state, states)`` of ``h' = relu(x @ W_ih + h @ W_hh)`` in float64.

    ``w_hh`` may be a matrix ``(H, H)`` or the diagonal ``(H,)`` of one. Each sequence ``b`` is
    cut to ``xs[b, :lengths[b]]`` before the loop, so padding never enters.
    """
    w_ih, w_hh, xs = (np.asarray(a, np.float64) for a in (w_ih, w_hh, xs))
    if w_hh.ndim == 1:
        w_hh = np.diag(w_hh)
    batch, time, _ = xs.shape
    features = w_ih.shape[1]
    h0 = np.zeros((batch, features)) if initial_state is None else np.asarray(initial_state, np.float64)
    states = np.zeros((batch, time, features))
    final_state = h0.copy()
    for b in range(batch):
        h = h0[b]
        for t, x in enumerate(xs[b, : int(lengths[b])]):
            h = np.maximum(0.0, x @ w_ih + h @ w_hh)
            states[b, t] = h
        final_state[b] = h
    return final_state, states
