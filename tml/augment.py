"""On-device geometric augmentation and test-time crops (DeVries et al. 2014).

Everything here is pure ``jnp``, batch-first and jitted (sizes and ranges are
static arguments: pass sizes as tuples), so it runs inside a jitted,
``shard_map``-ed train step, where the inner jits are inlined; each device
passes its own key (``fold_in(rng, axis_index)``) and gets independent
per-example draws. Jitting the public functions also keeps eager use (tests,
notebooks) to one compilation per shape instead of one per primitive.

Coordinates follow tml's convention: (x, y) pixel coordinates, x = column,
0-based, integer values at pixel centres; an image of width W spans
[-0.5, W - 0.5].

The maths, once, in homogeneous coordinates. Per example, with ``c_in =
((W-1)/2, (H-1)/2)`` and ``c_out = ((w-1)/2, (h-1)/2)`` the centres of the
input (H, W) and output (h, w) frames, the FORWARD map (input pixel ->
output pixel) is::

    F = T(c_out + t) . Z(z) . R(theta) . D(f) . T(-c_in)

read right to left: move the input centre to the origin; mirror x if
``f`` (``D = diag(-1, 1)``, which is exactly x -> W - 1 - x about the centre);
rotate by ``theta`` (``R = [[cos, -sin], [sin, cos]]`` acting on (x, y) with y
pointing down, so a positive angle turns the content clockwise on screen);
magnify by ``z >= 1`` (zoom in); shift by ``t = (tx, ty)`` pixels; and put the
origin at the output centre, which is the centred (h, w) crop.

The crop. DeVries shift by +-3 px and then crop 48 -> 42. A random 42-crop of
a 48 image has offsets 0..6 = centre +- 3 px, i.e. it IS a +-3 px shift of
the centred crop; we therefore take the centred crop always and let ``t``
carry the crop position (one +-max_shift, not +-3 from a shift plus another
+-3 from a random crop). With zero parameters, F is the plain centred crop:
output pixel (i, j) = input pixel (i + (H-h)/2, j + (W-w)/2).

Images are resampled with the SAMPLING map ``M = F^-1`` (output -> input,
what the ``(B, 2, 3)`` matrices hold); landmarks move with ``F`` itself and,
where mirrored, are re-indexed with ``FLIP_PERM`` so index i still names the
same anatomical point.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tml import landmarks as lm


class AffineParams(NamedTuple):
  """Per-example transform parameters, each with leading batch axis B.

  Attributes:
    flip: ``(B,)`` bool, mirror left-right.
    angle: ``(B,)`` float32 rotation in radians (positive = clockwise on
      screen).
    zoom: ``(B,)`` float32 magnification, >= 1 zooms in.
    shift: ``(B, 2)`` float32 (tx, ty) translation in output pixels.
  """
  flip: jax.Array
  angle: jax.Array
  zoom: jax.Array
  shift: jax.Array


# ------------------------------------------------------------------ matrices


def _homogeneous(linear, translation):
  """(B, 2, 2) linear part + (B, 2) translation -> (B, 3, 3)."""
  batch = linear.shape[0]
  top = jnp.concatenate([linear, translation[:, :, None]], axis=2)
  bottom = jnp.broadcast_to(
      jnp.array([0.0, 0.0, 1.0], linear.dtype), (batch, 1, 3))
  return jnp.concatenate([top, bottom], axis=1)


def _matmul(a, b):
  # HIGHEST: the TPU default (bf16 passes) and GPU TF32 would put errors of
  # ~0.1 px into coordinates of size ~50; these matrices are tiny anyway.
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _translate(t):
  batch = t.shape[0]
  eye = jnp.broadcast_to(jnp.eye(2, dtype=t.dtype), (batch, 2, 2))
  return _homogeneous(eye, t)


@functools.partial(jax.jit, static_argnames=("in_size", "out_size"))
def forward_matrices(params: AffineParams, in_size, out_size) -> jax.Array:
  """The forward maps F (input pixel -> output pixel), ``(B, 3, 3)``.

  ``F = T(c_out + t) . Z(z) . R(theta) . D(f) . T(-c_in)``; see the module
  docstring. ``in_size`` and ``out_size`` are static (height, width) pairs.
  """
  (in_h, in_w), (out_h, out_w) = in_size, out_size
  angle = params.angle.astype(jnp.float32)
  batch = angle.shape[0]
  c_in = jnp.broadcast_to(
      jnp.array([(in_w - 1) / 2, (in_h - 1) / 2], jnp.float32), (batch, 2))
  c_out = jnp.array([(out_w - 1) / 2, (out_h - 1) / 2], jnp.float32)
  zero = jnp.zeros_like(angle)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  mirror = jnp.where(params.flip, -1.0, 1.0).astype(jnp.float32)
  z = params.zoom.astype(jnp.float32)
  one = jnp.ones_like(angle)
  d = jnp.stack([jnp.stack([mirror, zero], -1),
                 jnp.stack([zero, one], -1)], axis=1)
  r = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], 1)
  zr = z[:, None, None] * r
  no_shift = jnp.zeros((batch, 2), jnp.float32)
  f = _translate(c_out + params.shift.astype(jnp.float32))
  for m in (_homogeneous(zr, no_shift), _homogeneous(d, no_shift),
            _translate(-c_in)):
    f = _matmul(f, m)
  return f


@jax.jit
def invert_affine(matrices: jax.Array) -> jax.Array:
  """Inverts affine maps ``[A | b]``: ``(B, 2, 3)`` or ``(B, 3, 3)`` -> ``(B, 2, 3)``.

  Closed form ``[A^-1 | -A^-1 b]`` (2x2 adjugate over determinant), so the
  landmark map is the exact inverse of the sampling map up to float32
  rounding, with no iterative solve.
  """
  a, b = matrices[:, :2, :2], matrices[:, :2, 2]
  det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
  adj = jnp.stack([jnp.stack([a[:, 1, 1], -a[:, 0, 1]], -1),
                   jnp.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], axis=1)
  inv = adj / det[:, None, None]
  shift = -(inv * b[:, None, :]).sum(-1)      # elementwise: exact float32
  return jnp.concatenate([inv, shift[:, :, None]], axis=2)


@functools.partial(jax.jit, static_argnames=("in_size", "out_size"))
def sampling_matrices(params: AffineParams, in_size, out_size) -> jax.Array:
  """The sampling maps M = F^-1 (output pixel -> input pixel), ``(B, 2, 3)``."""
  return invert_affine(forward_matrices(params, in_size, out_size))


# ------------------------------------------------------------------ sampling


@functools.partial(jax.jit, static_argnames=(
    "batch_size", "max_shift", "max_rotate_deg", "max_zoom", "flip",
    "integer_shift"))
def sample_params(rng: jax.Array, batch_size: int, *, max_shift: float,
                  max_rotate_deg: float, max_zoom: float, flip: bool,
                  integer_shift: bool = False) -> AffineParams:
  """Draws independent per-example parameters.

  Args:
    rng: one PRNG key (per device inside a data-parallel step).
    batch_size: B (static).
    max_shift: shift uniform in [-max_shift, max_shift] px per axis
      (DeVries: 3; includes the crop position, see the module docstring).
    max_rotate_deg: angle uniform in [-max, max] degrees (DeVries FER: 45;
      TFD: 0).
    max_zoom: zoom uniform in [1, max_zoom] (DeVries FER: 1.2; 1 = off).
    flip: mirror with probability 1/2 when True, never when False.
    integer_shift: draw whole-pixel shifts (uniform over the integers in
      [-floor(max_shift), floor(max_shift)]), the classic random crop; with no
      rotation or zoom the warp is then an exact pixel copy, no blur.

  Returns:
    AffineParams with leading axis B.
  """
  if max_shift < 0 or max_rotate_deg < 0 or max_zoom < 1:
    raise ValueError("need max_shift >= 0, max_rotate_deg >= 0, max_zoom >= 1; "
                     f"got {max_shift}, {max_rotate_deg}, {max_zoom}")
  # One (B, 5) uniform draw, mapped to each parameter: a single threefry call
  # compiles several times faster on CPU than one per parameter.
  u = jax.random.uniform(rng, (batch_size, 5), jnp.float32)
  flips = (u[:, 0] < 0.5) if flip else jnp.zeros((batch_size,), bool)
  max_rad = math.radians(max_rotate_deg)
  angle = (2.0 * u[:, 1] - 1.0) * max_rad
  zoom = 1.0 + u[:, 2] * (max_zoom - 1.0)
  if integer_shift:
    m = int(math.floor(max_shift))
    # floor(u * (2m + 1)) is uniform over 0..2m (u < 1 strictly).
    shift = jnp.floor(u[:, 3:5] * (2 * m + 1)) - m
  else:
    shift = (2.0 * u[:, 3:5] - 1.0) * max_shift
  return AffineParams(flips, angle, zoom, shift)


@functools.partial(jax.jit, static_argnames=(
    "batch_size", "in_size", "out_size", "max_shift", "max_rotate_deg",
    "max_zoom", "flip", "integer_shift"))
def sample_affine(rng: jax.Array, batch_size: int, *, in_size, out_size,
                  max_shift: float, max_rotate_deg: float, max_zoom: float,
                  flip: bool, integer_shift: bool = False):
  """Random sampling matrices for a batch.

  Args:
    rng: PRNG key.
    batch_size: B (static).
    in_size: (H, W) of the input images (static).
    out_size: (h, w) of the output (static), e.g. (42, 42) from (48, 48).
    max_shift, max_rotate_deg, max_zoom, flip, integer_shift: see
      `sample_params`.

  Returns:
    ``(matrices, flips)``: ``(B, 2, 3)`` float32 maps from OUTPUT pixel (x, y)
    to INPUT pixel (x, y) (for `warp_images`), and ``(B,)`` bool mirror flags
    (for `warp_landmarks`).
  """
  params = sample_params(rng, batch_size, max_shift=max_shift,
                         max_rotate_deg=max_rotate_deg, max_zoom=max_zoom,
                         flip=flip, integer_shift=integer_shift)
  return sampling_matrices(params, in_size, out_size), params.flip


# ------------------------------------------------------------------- warping


@functools.partial(jax.jit, static_argnames=("out_size", "mode", "cval"))
def warp_images(images: jax.Array, matrices: jax.Array, out_size, *,
                mode: str = "edge", cval: float = 0.0) -> jax.Array:
  """Bilinear resampling of each image at its sampling map.

  Output pixel (x, y) of image b takes the bilinear interpolation of input
  image b at ``matrices[b] @ (x, y, 1)``: four flat gathers (one per
  neighbour) over the whole batch, no per-example loop; one general path
  for any affine map.

  Args:
    images: ``(B, H, W, C)``; integer images are converted to float32.
    matrices: ``(B, 2, 3)`` output -> input maps (from `sample_affine`).
    out_size: (h, w), static.
    mode: what lies outside the input. ``"edge"`` (default) clamps the
      coordinate to the image, i.e. replicates the border pixels -- right for
      background-free face crops (DeVries), where a constant would paint
      artificial black corners the net could learn from. ``"constant"`` pads
      with ``cval`` and interpolates into it (scipy's ``grid-constant``).
    cval: the padding value for ``mode="constant"``.

  Returns:
    ``(B, h, w, C)`` images, float dtype of the input (float32 for ints).
  """
  if mode not in ("edge", "constant"):
    raise ValueError(f"mode must be 'edge' or 'constant', got {mode!r}")
  batch, in_h, in_w, chans = images.shape
  out_h, out_w = out_size
  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) \
      else jnp.float32
  ys, xs = jnp.meshgrid(jnp.arange(out_h, dtype=jnp.float32),
                        jnp.arange(out_w, dtype=jnp.float32), indexing="ij")
  xs, ys = xs.ravel()[None], ys.ravel()[None]             # (1, P)
  # Elementwise rather than einsum: matmul units would round the input
  # coordinates (bf16 on TPU, TF32 on GPU) by up to ~0.1 px.
  m = matrices.astype(jnp.float32)[:, :, :, None]         # (B, 2, 3, 1)
  x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]       # (B, P)
  y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]

  if mode == "edge":
    x = jnp.clip(x, 0.0, in_w - 1.0)
    y = jnp.clip(y, 0.0, in_h - 1.0)
  x0f, y0f = jnp.floor(x), jnp.floor(y)
  fx, fy = (x - x0f)[..., None], (y - y0f)[..., None]     # (B, P, 1)
  x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
  pixels = images.reshape(batch * in_h * in_w, chans).astype(jnp.float32)
  base = jnp.arange(batch, dtype=jnp.int32)[:, None] * (in_h * in_w)

  def tap(yy, xx):
    # Four separate (B*P, C) gathers: ~10x faster on CPU than one gather of
    # stacked (B, P, 4) indices followed by a weighted reduction over the 4.
    inside = (xx >= 0) & (xx < in_w) & (yy >= 0) & (yy < in_h)
    flat = base + jnp.clip(yy, 0, in_h - 1) * in_w + jnp.clip(xx, 0, in_w - 1)
    vals = jnp.take(pixels, flat.reshape(-1), axis=0, mode="clip")
    vals = vals.reshape(batch, out_h * out_w, chans)
    if mode == "constant":    # an outside tap reads cval, keeping its weight
      vals = jnp.where(inside[..., None], vals, jnp.float32(cval))
    return vals

  top = (1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1)
  bottom = (1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)
  out = (1 - fy) * top + fy * bottom
  return out.reshape(batch, out_h, out_w, chans).astype(dtype)


@jax.jit
def warp_landmarks(landmarks: jax.Array, matrices: jax.Array,
                   flips: jax.Array) -> jax.Array:
  """Moves landmarks with the images warped by `warp_images`.

  Args:
    landmarks: ``(B, 68, 2)`` (x, y) pixels in the input frame.
    matrices: ``(B, 2, 3)`` the SAMPLING maps (output -> input) that warped
      the images; the landmarks take their exact inverse (input -> output).
    flips: ``(B,)`` bool, which examples were mirrored (from `sample_affine`).

  Returns:
    ``(B, 68, 2)`` (x, y) pixels in the output frame, re-indexed with
    ``FLIP_PERM`` where mirrored so index i is still the same anatomical point
    (after a mirror, the subject's right eye corner 36 is again the
    image-left outer eye corner of a frontal face).
  """
  fwd = invert_affine(matrices.astype(jnp.float32))[:, None]   # (B, 1, 2, 3)
  x, y = landmarks[..., 0], landmarks[..., 1]
  moved = jnp.stack(
      [fwd[..., 0, 0] * x + fwd[..., 0, 1] * y + fwd[..., 0, 2],
       fwd[..., 1, 0] * x + fwd[..., 1, 1] * y + fwd[..., 1, 2]], axis=-1)
  perm = jnp.asarray(lm.FLIP_PERM)
  return jnp.where(flips[:, None, None], moved[:, perm, :], moved)


@functools.partial(jax.jit, static_argnames=(
    "out_size", "max_shift", "max_rotate_deg", "max_zoom", "flip",
    "integer_shift", "mode"))
def augment(rng: jax.Array, images: jax.Array, landmarks: jax.Array | None,
            *, out_size, max_shift: float, max_rotate_deg: float,
            max_zoom: float, flip: bool, integer_shift: bool = False,
            mode: str = "edge"):
  """Random mirror/shift/rotate/zoom + crop of a batch, images and landmarks.

  Args:
    rng: PRNG key (one per device; per-example draws come from it).
    images: ``(B, H, W, C)``.
    landmarks: ``(B, 68, 2)`` (x, y) in the input frame, or None.
    out_size: (h, w) static output size (DeVries: (42, 42)).
    max_shift, max_rotate_deg, max_zoom, flip, integer_shift: see
      `sample_params`; mode: see `warp_images`.

  Returns:
    ``(images (B, h, w, C), landmarks (B, 68, 2) or None)``.
  """
  batch, in_h, in_w, _ = images.shape
  matrices, flips = sample_affine(
      rng, batch, in_size=(in_h, in_w), out_size=out_size,
      max_shift=max_shift, max_rotate_deg=max_rotate_deg, max_zoom=max_zoom,
      flip=flip, integer_shift=integer_shift)
  out = warp_images(images, matrices, out_size, mode=mode)
  if landmarks is None:
    return out, None
  return out, warp_landmarks(landmarks, matrices, flips)


# --------------------------------------------------------- test-time crops


def crop_offsets(in_size, out_size) -> tuple[tuple[int, int], ...]:
  """(row, col) top-left offsets of the 5 crops, in `ten_crops` order.

  Order: top-left, top-right, bottom-left, bottom-right, centre. The centre
  crop starts at ``((H-h)//2, (W-w)//2)``: exactly centred when H-h is even
  (48 -> 42: offset 3, the same pixels as `sample_affine` with zero
  parameters), half a pixel up/left of centre when odd.
  """
  (in_h, in_w), (out_h, out_w) = in_size, out_size
  if out_h > in_h or out_w > in_w:
    raise ValueError(f"crop {out_size} larger than image {in_size}")
  dy, dx = in_h - out_h, in_w - out_w
  return ((0, 0), (0, dx), (dy, 0), (dy, dx), (dy // 2, dx // 2))


@functools.partial(jax.jit, static_argnames=("out_size",))
def center_crop(images: jax.Array, out_size) -> jax.Array:
  """``(B, H, W, C)`` -> ``(B, h, w, C)`` centre crop (see `crop_offsets`)."""
  (oy, ox) = crop_offsets(images.shape[1:3], out_size)[4]
  return images[:, oy:oy + out_size[0], ox:ox + out_size[1], :]


@functools.partial(jax.jit, static_argnames=("out_size",))
def ten_crops(images: jax.Array, out_size) -> jax.Array:
  """DeVries / Krizhevsky test-time patches, ``(B, H, W, C)`` -> ``(B, 10, h, w, C)``.

  Index 0-4: top-left, top-right, bottom-left, bottom-right, centre crops of
  the image; 5-9: the same five crops (same offsets) of its left-right mirror.
  Average the per-patch softmax outputs over axis 1.
  """
  out_h, out_w = out_size
  offsets = crop_offsets(images.shape[1:3], out_size)
  mirrored = images[:, :, ::-1, :]
  crops = [src[:, oy:oy + out_h, ox:ox + out_w, :]
           for src in (images, mirrored) for (oy, ox) in offsets]
  return jnp.stack(crops, axis=1)


@functools.partial(jax.jit, static_argnames=("in_size", "out_size"))
def ten_crop_landmarks(landmarks: jax.Array, in_size, out_size) -> jax.Array:
  """Landmarks for each of `ten_crops`' patches, ``(B, 68, 2)`` -> ``(B, 10, 68, 2)``.

  Mirrored patches use ``landmarks.flip_horizontal`` (x -> W - 1 - x and
  FLIP_PERM re-indexing) before the crop offset is subtracted.
  """
  offsets = crop_offsets(in_size, out_size)
  mirrored = lm.flip_horizontal(landmarks, in_size[1])
  shifts = np.array([[ox, oy] for (oy, ox) in offsets], np.float32)  # (5, 2)
  plain = landmarks[:, None] - shifts[None, :, None, :]
  flipped = mirrored[:, None] - shifts[None, :, None, :]
  return jnp.concatenate([plain, flipped], axis=1)
