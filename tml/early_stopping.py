"""Task-wise early stopping of the auxiliary (emotion) task, Chu Eq. 4.

With ``E(i)`` the emotion loss at "iteration" ``i`` and the window of the
last ``k + 1`` values ``i = t - k .. t``, the emotion task is stopped when

    k * med(E) / (sum(E) - k * med(E)) > epsilon.

What ``E(i)`` is (the paper is silent; DESIGN.md): by default ``i`` counts
epochs and ``E(i)`` is the mean training emotion loss of epoch ``i`` (the
mean of that epoch's global-batch losses), so ``k`` is in epochs
(:func:`update_epoch`). The per-step form, ``E(i)`` = the loss of batch
``i`` (:func:`update`), stays an option; measured on real runs it is
dominated by batch noise (the value swings 40-120 around ``k = 60``) and
fires at the first full window whatever epsilon is.

The state is a small pytree carried in the train state and updated inside the
jitted step (or a ``lax.scan``); once stopped it stays stopped, and the train
step multiplies the emotion term by ``1 - stopped`` from the next step on.

How to read the value: with ``m`` the window's mean the criterion is
``k * med / ((k + 1) * m - k * med) = k / (1 + S / med)``, where
``S = sum(E - med)`` is the window's skew about its median. A flat window
(converged) gives exactly ``k``, as does any window symmetric about its
median -- in particular a steady LINEAR decline gives exactly ``k``: Eq. 4
measures the window's curvature, not its slope, so no ``epsilon < k`` can
wait through a linear decline, and a decline that is nearly linear over
``k + 1`` epochs (slow relative to ``k``) looks converged. A convex window
(a few large values above a low median: the loss still dropping fast and
flattening) gives less than ``k``; noise makes ``S`` wander about 0. So
``epsilon`` sits just below ``k``: the task stops once the window's
curvature is below ``k / epsilon - 1`` (about 11 % of the median for the
shipped ``epsilon = 0.9 k``), i.e. once the drop has become small relative
to the loss level and its noise.

The shipped defaults (``experiments/chu.flags``: unit ``epoch``, ``k = 5``,
``epsilon = 4.5``) were chosen on simulated noisy exponential decays
``E(i) = a exp(-i / tau) + c`` with ``tau`` in {3, 8, 20} epochs,
``a / c`` in {0.5, 1, 2} and noise ``E * (1 + s_m n1) + s_a c n2`` of up to
3 % of ``c`` each (``tests/test_early_stopping.py``):

* it does not fire while the noiseless curve still falls by more than 8 % of
  its current value per epoch (over 1,000 seeds per case the largest drop
  rate at the firing epoch was 7.8 %, 6.1 % for noise <= 2 %);
* it fires at most ``k + 3`` epochs after the curve is flat within its
  noise (the noiseless excess ``a exp(-i / tau)`` below the noise std
  ``hypot(s_m, s_a) c``; measured at most 2 epochs after).

Curves slower than that (tau = 20: 1.6-3.3 %/epoch at most) are the blind spot
named above: the criterion cannot tell them from flat within ``k`` epochs.
Because a stage-2 schedule of 12-60 epochs must leave room for the window,
``k`` must be small; ``k = 5`` can fire from the 6th epoch on.

Edge cases (the paper is silent; this is the house reading):

* Until ``k + 1`` values have been pushed the criterion is 0.0 and the task
  is not stopped.
* A non-positive denominator ``sum - k * med <= 0`` (the values below the
  median are near zero, e.g. a window of zeros, or ``[0, 0, 5, 5, 5]`` for
  ``k = 4``; the ratio would jump from +inf to negative) counts as "not
  converged": criterion 0.0.
* A non-finite loss (NaN or inf) is NOT pushed into the window (nor added to
  the epoch's sum) -- it would otherwise poison the next ``k + 1`` criteria
  -- the counts do not advance, ``stopped`` is unchanged, and the returned
  criterion is NaN so the caller's NaN guard (which checks every logged
  measurement) sees the step. An epoch without any finite loss pushes
  nothing.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

UNITS = ("epoch", "step")


@flax.struct.dataclass
class EarlyStopState:
  """Ring buffer of recent auxiliary-task losses plus the sticky stop flag.

  Attributes:
    window: ``(k + 1,)`` float32 ring buffer; slot ``count % (k + 1)`` is
      written next. Order within the buffer is irrelevant (median and sum).
    count: ``()`` int32, number of (finite) values pushed so far.
    stopped: ``()`` bool, sticky: once True it never returns to False.
    criterion: ``()`` float32, Eq. 4's value at the last push (0.0 until the
      window is full or where the denominator is non-positive).
    epoch_sum: ``()`` float32, sum of this epoch's finite losses so far
      (:func:`update_epoch`; reset at every epoch boundary).
    epoch_count: ``()`` int32, how many losses ``epoch_sum`` holds.
    stopped_step: ``()`` int32, the ``step`` passed to the update that set
      ``stopped`` (the train step passes the number of steps done in the
      stage, so the emotion term is masked from that step index on); -1
      while not stopped.
  """
  window: jax.Array
  count: jax.Array
  stopped: jax.Array
  criterion: jax.Array
  epoch_sum: jax.Array
  epoch_count: jax.Array
  stopped_step: jax.Array

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
      stopped=jnp.zeros((), jnp.bool_),
      criterion=jnp.zeros((), jnp.float32),
      epoch_sum=jnp.zeros((), jnp.float32),
      epoch_count=jnp.zeros((), jnp.int32),
      stopped_step=jnp.full((), -1, jnp.int32))


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


def update(state: EarlyStopState, loss: jax.Array, epsilon: jax.Array, *,
           step: jax.Array | int | None = None
           ) -> tuple[EarlyStopState, jax.Array, jax.Array]:
  """Pushes one loss value and evaluates Eq. 4 (the per-step form).

  Args:
    state: the current :class:`EarlyStopState`.
    loss: ``()`` the auxiliary task's loss at this iteration (the batch mean
      of the emotion loss; pass it through ``lax.stop_gradient`` if computed
      inside the differentiated function).
    epsilon: ``()`` threshold; may be a traced value.
    step: ``()`` int recorded in ``stopped_step`` if this push stops the
      task; default: the number of values pushed including this one.

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
  count = jnp.where(finite, state.count + 1, state.count).astype(jnp.int32)

  value, defined = criterion(window)
  # Gate on `full` and `defined`, not only on the value: a 0.0 placeholder
  # must not trigger a stop when epsilon is negative.
  ready = finite & (count >= n) & defined
  crit = jnp.where(ready, value, 0.0).astype(jnp.float32)
  stopped = state.stopped | (ready & (crit > epsilon))
  step = count if step is None else jnp.asarray(step, jnp.int32)
  fired = stopped & ~state.stopped
  new_state = state.replace(
      window=window, count=count, stopped=stopped,
      criterion=jnp.where(finite, crit, state.criterion),
      stopped_step=jnp.where(fired, step, state.stopped_step).astype(jnp.int32))
  return new_state, jnp.where(finite, crit, jnp.nan), stopped


def update_epoch(state: EarlyStopState, loss: jax.Array, epsilon: jax.Array, *,
                 epoch_end: jax.Array | bool,
                 step: jax.Array | int | None = None
                 ) -> tuple[EarlyStopState, jax.Array, jax.Array]:
  """Adds one batch loss to the epoch's mean; pushes the mean at the epoch end.

  Call it once per train step with that step's global-batch emotion loss.
  At ``epoch_end`` (the last step of an epoch: ``(step + 1) %
  steps_per_epoch == 0``) the epoch's mean loss is pushed into the window
  as one ``E(i)`` (:func:`update`) and the running sum is reset; other steps
  only accumulate.

  Args:
    state: the current :class:`EarlyStopState`.
    loss: ``()`` this step's auxiliary-task loss.
    epsilon: ``()`` threshold; may be traced.
    epoch_end: ``()`` bool, may be traced.
    step: as in :func:`update` (default: the number of epochs pushed).

  Returns:
    ``(new_state, criterion, stopped)``: ``criterion`` is the value at the
    last push (so it changes only at epoch boundaries; NaN on a step whose
    loss is not finite), ``stopped`` equals ``new_state.stopped``.
  """
  loss = jnp.asarray(loss, jnp.float32)
  epoch_end = jnp.asarray(epoch_end, jnp.bool_)
  finite = jnp.isfinite(loss)
  total = state.epoch_sum + jnp.where(finite, loss, 0.0)
  n = state.epoch_count + finite.astype(jnp.int32)
  mean = total / jnp.maximum(n, 1).astype(jnp.float32)
  pushed, _, _ = update(state, mean, epsilon, step=step)
  push = epoch_end & (n > 0)
  new_state = jax.tree.map(lambda a, b: jnp.where(push, a, b), pushed, state)
  new_state = new_state.replace(
      epoch_sum=jnp.where(epoch_end, 0.0, total).astype(jnp.float32),
      epoch_count=jnp.where(epoch_end, 0, n).astype(jnp.int32))
  crit = jnp.where(finite, new_state.criterion, jnp.nan)
  return new_state, crit, new_state.stopped
