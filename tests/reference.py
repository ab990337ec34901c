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



def numpy_scalar_grad(w_ih, w_hh, xs, lengths, targets, *, per_step):
    """Returns the float64 gradient ``(dL/dW_ih, dL/dW_hh)`` of the scalar cell
    ``h' = relu(W_ih x + W_hh h)``, by the adjoint recurrence written out one step at a time.

    The loss is the mean squared error of the final state of each sequence (``per_step=False``,
    as ``L1Norm``, which the caller feeds ``|x|``) or of every state before each length
    (``per_step=True``, as ``RunningCount``).
    """
    xs, targets = np.asarray(xs, np.float64), np.asarray(targets, np.float64)
    grad = np.zeros(2)
    count = int(np.sum(lengths)) if per_step else len(xs)
    for x, n, y in zip(xs, lengths, targets):
        n = int(n)
        h, z = np.zeros(n + 1), np.zeros(n)  # h[t + 1] is the state after step t
        for t in range(n):
            z[t] = w_ih * x[t] + w_hh * h[t]
            h[t + 1] = max(0.0, z[t])
        errors = np.zeros(n)
        if per_step:
            errors = 2 * (h[1:] - y[:n]) / count
        elif n:
            errors[-1] = 2 * (h[n] - y) / count
        adjoint = 0.0  # dL/dh after step t, carried back from step t + 1
        for t in reversed(range(n)):
            adjoint = errors[t] + (w_hh * adjoint if t + 1 < n and z[t + 1] > 0 else 0.0)
            if z[t] > 0:
                grad += adjoint * np.array([x[t], h[t]])
    return grad


def numpy_scalar_adam(w_ih, w_hh, batches, *, per_step, lr, b2, decay_steps=None, final_lr=0.0,
                      square_input=False, b1=0.9, eps=1e-8):
    """Trains the scalar cell with Adam in float64 on ``batches``, one
    ``(xs, lengths, targets)`` per step (loss: see ``numpy_scalar_grad``); returns the weights
    ``(W_ih, W_hh)`` after each step, ``(steps, 2)``.

    ``square_input`` trains ``v`` with ``W_ih = v * v`` (``w_ih`` is then ``v``'s initial
    value); ``decay_steps`` cosine-decays the learning rate to ``final_lr * lr`` as optax does. The decay rates
    enter as optax's float32 run has them, ``b`` and ``1 - b`` each rounded to float32: 0.999
    becomes 0.99900001287, so the first step's bias correction is off by 1.3e-5 relative, and
    trajectories that start so differently drift apart by 1e-3 within 20 steps.
    """
    b1_moment, b2_moment = (float(np.float32(1 - b)) for b in (b1, b2))
    b1_f32, b2_f32 = (float(np.float32(b)) for b in (b1, b2))
    params = np.array([w_ih, w_hh], np.float64)
    m, v = np.zeros(2), np.zeros(2)
    trajectory = []
    for step, (xs, lengths, targets) in enumerate(batches):
        weights = np.array([params[0] ** 2 if square_input else params[0], params[1]])
        grad = numpy_scalar_grad(*weights, xs, lengths, targets, per_step=per_step)
        if square_input:
            grad[0] *= 2 * params[0]
        m = b1_f32 * m + b1_moment * grad
        v = b2_f32 * v + b2_moment * grad**2
        if decay_steps is None:
            rate = lr
        else:
            cosine = 0.5 * (1 + np.cos(np.pi * min(step, decay_steps) / decay_steps))
            rate = lr * ((1 - final_lr) * cosine + final_lr)
        m_hat, v_hat = m / (1 - b1_f32 ** (step + 1)), v / (1 - b2_f32 ** (step + 1))
        params = params - rate * m_hat / (np.sqrt(v_hat) + eps)
        trajectory.append([params[0] ** 2 if square_input else params[0], params[1]])
    return np.array(trajectory)
