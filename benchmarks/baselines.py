"""What rnnjax is measured against: flax nn.RNN, torch nn.RNN (cuDNN on a GPU), and the seed
notebook's PyTorch loop. Each builder returns ``(forward, train_step, sync)`` closures over one
(time, batch) problem: the L1 norm of ``xs`` (batch, time), MSE against its targets, Adam 0.1."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax import L1Norm, ReLUCell
from rnnjax.training.data import Batch
from rnnjax.training.fit import init_state, make_train_step


def problem(time: int, batch: int, seed: int = 0):
    """Standard-normal sequences (batch, time) and their L1 norms, as NumPy float32."""
    xs = np.random.default_rng(seed).standard_normal((batch, time), dtype=np.float32)
    return xs, np.abs(xs.astype(np.float64)).sum(axis=1).astype(np.float32)


def _jax_closures(model: nn.Module, xs: np.ndarray, targets: np.ndarray):
    batch = Batch(jnp.asarray(xs), jnp.full((xs.shape[0],), xs.shape[1], jnp.int32), jnp.asarray(targets))
    optimizer = optax.adam(0.1)
    state = init_state(model, optimizer, jax.random.key(3), batch)
    step = make_train_step(model, optimizer)
    forward = jax.jit(model.apply)
    return (lambda: forward(state.params, batch.xs, batch.lengths),
            lambda: step(state, batch),
            jax.block_until_ready)


def train_step_memory(method: str, time: int, batch: int) -> int:
    """Bytes of temporary memory the compiled training step of ``L1Norm(method)`` needs for
    (batch, time) inputs; compiled from shapes alone, nothing is run."""
    model, optimizer = L1Norm(method=method), optax.adam(0.1)
    small = Batch(jnp.ones((1, 2)), jnp.full((1,), 2, jnp.int32), jnp.ones(1))
    state = init_state(model, optimizer, jax.random.key(3), small)
    shapes = Batch(jax.ShapeDtypeStruct((batch, time), jnp.float32),
                   jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.float32))
    compiled = make_train_step(model, optimizer).lower(state, shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def rnnjax_model(method: str):
    def build(xs, targets):
        return _jax_closures(L1Norm(method=method), xs, targets)

    return build


class FlaxRNNL1(nn.Module):
    """The L1 network through flax's own ``nn.RNN`` (``nn.scan``) over a bias-free ReLU cell."""

    @nn.compact
    def __call__(self, xs, lengths=None):
        magnitudes = jnp.where(xs < 0, -xs, xs)[..., None]
        states = nn.RNN(ReLUCell(1))(magnitudes, seq_lengths=lengths)
        return states[:, -1, 0]


def flax_rnn(xs, targets):
    return _jax_closures(FlaxRNNL1(), xs, targets)


def _torch_closures(module, xs, targets):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.to(device)
    x = torch.as_tensor(xs, device=device).unsqueeze(-1)
    y = torch.as_tensor(targets, device=device)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()

    def forward():
        with torch.no_grad():
            return module(x)

    def train_step():
        optimizer.zero_grad()
        loss = loss_fn(module(x), y)
        loss.backward()
        optimizer.step()
        return loss

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    return forward, train_step, sync


def torch_rnn(xs, targets):
    """torch ``nn.RNN(relu, bias=False)``: cuDNN on a GPU, ATen's loop on a CPU."""
    import torch

    class TorchRNNL1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.RNN(1, 1, nonlinearity="relu", bias=False, batch_first=True)

        def forward(self, x):
            _, final = self.rnn(torch.where(x < 0, -x, x))
            return final[0, :, 0]

    return _torch_closures(TorchRNNL1(), xs, targets)


def torch_seed_loop(xs, targets):
    """The seed notebook's network: ``nn.RNNCell`` stepped by a Python loop over time."""
    import torch

    class SeedLoopL1(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.RNNCell(1, 1, bias=False, nonlinearity="relu")

        def forward(self, x):
            hidden = torch.zeros(x.shape[0], 1, device=x.device)
            for t in range(x.shape[1]):  # the baseline being measured: one step per iteration
                step_input = x[:, t, :]
                hidden = self.cell(torch.where(step_input < 0, -step_input, step_input), hidden)
            return hidden[:, 0]

    return _torch_closures(SeedLoopL1(), xs, targets)
