"""Task-wise early stopping of the auxiliary (emotion) task, Chu Eq. 4.

With ``E(i)`` the emotion loss at iteration ``i`` and the window of the last
``k + 1`` values ``i = t - k .. t``, the emotion task is stopped when

    k * med(E) / (sum(E) - k * med(E)) > epsilon.

The state is a small pytree carried in the train state and updated inside the
jitted step (or a ``lax.scan``); once stopped it stays stopped, and the train
step multiplies the emotion term by ``1 - stopped``.

How to read the value: with ``m`` the window's mean the criterion is
``k * med / ((k + 1) * m - k * med)``. A flat window (converged) gives exactly
``k``, as does any window symmetric about its median; a window with a few
large values above a low median -- the loss still dropping fast -- gives less
than ``k``; a few low outliers give more. A steady linear decline also gives
``k``: the criterion measures the window's skew, not its slope. Log it every
step and choose ``epsilon`` (a config value) from the data.

Edge cases (the paper is silent; this is the house reading):

* Until ``k + 1`` values have been pushed the criterion is 0.0 and the task
  is not stopped.
* A non-positive denominator ``sum - k * med <= 0`` (the values below the
  median are near zero, e.g. a window of zeros, or ``[0, 0, 5, 5, 5]`` for
  ``k = 4``; the ratio would jump from +inf to negative) counts as "not
  converged": criterion 0.0.
* A non-finite loss (NaN or inf) is NOT pushed into the window -- it would
  otherwise poison the next ``k + 1`` criteria -- the count does not advance,
  ``stopped`` is unchanged, and the returned criterion is NaN so the
  caller's NaN guard (which checks every logged measurement) sees the step.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class EarlyStopState:
  """Ring buffer of recent auxiliary-task losses plus the sticky stop flag.

  Attributes:
    window: ``(k + 1,)`` float32 ring buffer; slot ``count % (k + 1)`` is
      written next. Order within the buffer is irrelevant (median and sum).
    count: ``()`` int32, number of (finite) values pushed so far.
    stopped: ``()`` bool, sticky: once True it never returns to False.
  """
  window: jax.Array
  count: jax.Array
  stopped: jax.Array

  @property
  def k(self) -> int:
    """The paper's k (static: the window length minus one)."""
    return self.window.shape[-1] - 1


def init_state(k: int) -> EarlyStopState:
  """An empty state for a window of ``k + 1`` losses (``k >= 1``)."""
  if int(k) < 1:
    raise ValueError(f"early stopping window k must be >= 1, got {k}")
  return EarlyStopState(
      window=jnp.zeros((int(k) + 1,), jnp.float32),
      count=jnp.zeros((), jnp.int32),
      stopped=jnp.zeros((), jnp.bool_))


def _median(values: jax.Array) -> jax.Array:
  """Median of a 1-D array; mean of the two middle values for even length."""
  n = values.shape[-1]
  s = jnp.sort(values)
  if n % 2:
    return s[n // 2]
  return 0.5 * (s[n // 2 - 1] + s[n // 2])


def criterion(window: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 4's left-hand side for a full window ``(k + 1,)``.

  Returns:
    ``(value, defined)``: ``defined`` is ``sum - k * med > 0``; where it is
    False the value is 0.0 and the window must not count as converged,
    whatever epsilon is.
  """
  k = window.shape[-1] - 1
  k_med = k * _median(window)
  denom = jnp.sum(window) - k_med
  defined = denom > 0
  value = jnp.where(defined, k_med / jnp.where(defined, denom, 1.0), 0.0)
  return value, defined


def update(state: EarlyStopState, loss: jax.Array, epsilon: jax.Array
           ) -> tuple[EarlyStopState, jax.Array, jax.Array]:
  """Pushes one loss value and evaluates Eq. 4.

  Args:
    state: the current :class:`EarlyStopState`.
    loss: ``()`` the auxiliary task's loss at this iteration (the batch mean
      of the emotion loss; pass it through ``lax.stop_gradient`` if computed
      inside the differentiated function).
    epsilon: ``()`` threshold; may be a traced value.

  Returns:
    ``(new_state, criterion, stopped)``: criterion ``()`` float32 (0.0 until
    the window is full or when the denominator is non-positive, NaN for a
    non-finite loss), stopped ``()`` bool, equal to ``new_state.stopped``.
  """
  loss = jnp.asarray(loss, jnp.float32)
  epsilon = jnp.asarray(epsilon, jnp.float32)
  n = state.window.shape[-1]
  finite = jnp.isfinite(loss)

  slot = jnp.mod(state.count, n)
  pushed = state.window.at[slot].set(loss)
  window = jnp.where(finite, pushed, state.window)
  count = jnp.where(finite, state.count + 1, state.count)

  value, defined = criterion(window)
  # Gate on `full` and `defined`, not only on the value: a 0.0 placeholder
  # must not trigger a stop when epsilon is negative.
  ready = finite & (count >= n) & defined
  crit = jnp.where(ready, value, 0.0)
  stopped = state.stopped | (ready & (crit > epsilon))
  crit = jnp.where(finite, crit, jnp.nan)
  new_state = EarlyStopState(window=window, count=count.astype(jnp.int32),
                             stopped=stopped)
  return new_state, crit.astype(jnp.float32), stopped
