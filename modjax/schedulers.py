"""Flow-matching schedulers as small steppers whose state rides in the `lax.scan` carry.

Two schedulers, both frozen and hashable (static under jit):

  FlowEuler(num_inference_steps, shift)      x <- x + (sigma_next - sigma) v, on
                                             `modjax.schedule.flow_sigmas` (today's sampler)
  FlowUniPC(num_inference_steps, flow_shift) diffusers' `UniPCMultistepScheduler` with
                                             prediction_type="flow_prediction",
                                             use_flow_sigmas=True: Wan2.1's default

and `from_diffusers_config(config, num_inference_steps, **overrides)` to build one
from a diffusers scheduler_config.json dict. CogVideoX's discrete-time
v-prediction schedulers follow the same protocol (see their section below):

  CogVideoXDDIM(num_inference_steps)         diffusers' CogVideoXDDIMScheduler
  CogVideoXDPM(num_inference_steps)          diffusers' CogVideoXDPMScheduler (stochastic:
                                             init(latents, key) takes the noise key)

Every scheduler has the same four members:

  timesteps()  -> float32 [steps]   the model's timestep input at each step
  step_inputs() -> {name: [steps, ...]} per-step scan inputs, data independent,
                  computed in float64 numpy and stored as float32 (bool for flags)
  init(latents) -> carry            a pytree of fixed shapes (UniPC: the last
                  sample and the previous x0 predictions; Euler: ())
  step(carry, latents, model_output, xs) -> (next latents, next carry)

How the sampler calls it (one compile for the whole schedule):

  sched = FlowUniPC(50, flow_shift=3.0)       # or from_diffusers_config(cfg, 50, flow_shift=3.0)
  # sched is static (hashable): a closure constant of the jitted function, or a static arg
  xs = dict(sched=sched.step_inputs(), branch=..., step=...)  # numpy, [steps, ...] leaves
  latents = jax.random.normal(key, shape, jnp.float32)  # init_noise_sigma = 1: no scaling
  carry = (latents, policy.init(), sched.init(latents))

  def body(carry, xs):
    latents, state, sc = carry
    t = jnp.full((rows,), xs["sched"]["timestep"], jnp.float32)
    v = model(latents, or concat([latents, latents]) with CFG, t, ...).astype(float32)
    v = v_uncond + guidance_scale * (v_cond - v_uncond)   # CFG first: step sees one velocity
    latents, sc = sched.step(sc, latents, v, xs["sched"])
    return (latents, state, sc), per_step_outputs

  carry, ys = jax.lax.scan(body, carry, jax.tree.map(jnp.asarray, xs))

- The model's timestep comes from xs["sched"]["timestep"], never from 1000 * sigma:
  UniPC hands the transformer diffusers' int64-truncated `scheduler.timesteps`
  (999, 857, 600 for 3 steps at shift 3; 600.72 would be 1000 sigma). For FlowEuler
  it is 1000 sigma in float32, what the sampler computes today.
- The scan length is sched.num_inference_steps; the scheduler needs no step
  counter (its per-step choices are in xs).
- Latents and carry stay float32 whatever the model's dtype; step casts the
  velocity to float32 (diffusers, fed a bf16 velocity, forms sigma * v in bf16).
- `scan_schedule(sched, model_fn, latents)` below is the minimal version of this
  loop (no policy, no CFG), used by the tests.

FlowUniPC follows diffusers 0.42.1 `scheduling_unipc_multistep.py` step by step:
the x0 prediction m_i = x_i - sigma_i v_i; the corrector UniC (from step 1, unless
step i - 1 is in disable_corrector) redoes the previous step with m_i; the
predictor UniP of order p_i = min(solver_order, i + 1, steps - i if
lower_order_final) moves to sigma_{i+1}. Both are linear in the latest sample
and the x0 history, so all their coefficients (B(h), the rhos, including the
order-3 linear solves) depend on the sigmas only and are precomputed here; the
traced step is a handful of multiply-adds and one select. Where diffusers
divides zero by zero or multiplies zero by infinity in a term that is zero by
construction, we take the limit (see `_bh_update`): bh1 into sigma = 0 and the
zero-length last step of final_sigmas_type="sigma_min" at order 3, both NaN in
diffusers; where the update truly diverges (lower_order_final=False into sigma =
0), the constructor refuses the options.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from modjax.schedule import flow_sigmas

_SOLVER_ORDERS = (1, 2, 3)
_SOLVER_TYPES = ("bh1", "bh2")
_FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
_EULER_SIGMA_SCHEDULES = ("modjax", "diffusers")


def _check_steps(num_inference_steps) -> int:
  if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
      or num_inference_steps < 1):
    raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
  return int(num_inference_steps)


def _check_positive(name: str, value) -> float:
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
      or value <= 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def _check_train_timesteps(value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"num_train_timesteps must be an int >= {minimum}, got {value!r}")
  return int(value)


def _check_choice(name: str, value, allowed) -> None:
  if isinstance(value, bool) or not any(type(value) is type(a) and value == a for a in allowed):
    raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_bool(name: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float64).astype(np.float32)


# ---------------------------------------------------------------------------
# Euler
# ---------------------------------------------------------------------------

class _EulerStep:
  """The flow-matching Euler stepper given `sigmas()` [steps + 1] and
  num_train_timesteps N: timestep N sigma, x <- x + (sigma_next - sigma) v in float32."""

  def timesteps(self) -> np.ndarray:
    """float32 [steps]: N sigma, computed in float32 (what the sampler feeds the model)."""
    return self.sigmas()[:-1] * np.float32(self.num_train_timesteps)

  def step_inputs(self) -> dict[str, np.ndarray]:
    s = self.sigmas()
    return dict(timestep=self.timesteps(), sigma=s[:-1], sigma_next=s[1:])

  def init(self, latents: jax.Array) -> tuple:
    del latents
    return ()

  def step(self, carry, latents, model_output, xs):
    latents = latents.astype(jnp.float32)
    velocity = model_output.astype(jnp.float32)
    return latents + (xs["sigma_next"] - xs["sigma"]) * velocity, carry


@dataclasses.dataclass(frozen=True)
class FlowEuler(_EulerStep):
  """The flow-matching Euler step x <- x + (sigma_next - sigma) v.

  sigma_schedule="modjax" (default): `modjax.schedule.flow_sigmas`, i.e. the
    sampler's schedule today: sigma = shift(linspace(1, 0, steps + 1)), the model
    timestep 1000 sigma (float32).
  sigma_schedule="diffusers": diffusers' `FlowMatchEulerDiscreteScheduler`
    (use_dynamic_shifting=False): shift(linspace(1, shift(1 / N), steps)) + [0]
    with N = num_train_timesteps -- note diffusers shifts the end point twice, so
    its last sigma is shift(shift(1 / N)), not shift(1 / N) -- and timestep N sigma.
    The two schedules differ; the update rule is the same (diffusers fed our
    sigmas with shift=1 reproduces "modjax" exactly, see the tests). Diffusers
    also casts the new latents to the model output's dtype (bf16 latents with a
    bf16 transformer); we keep float32.
  """
  num_inference_steps: int
  shift: float
  sigma_schedule: str = "modjax"
  num_train_timesteps: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "num_inference_steps", _check_steps(self.num_inference_steps))
    object.__setattr__(self, "shift", _check_positive("shift", self.shift))
    _check_choice("sigma_schedule", self.sigma_schedule, _EULER_SIGMA_SCHEDULES)
    object.__setattr__(self, "num_train_timesteps",
                       _check_train_timesteps(self.num_train_timesteps, 1))

  def sigmas(self) -> np.ndarray:
    """float32 [steps + 1]: sigma_0 = 1 > ... > sigma_steps = 0."""
    n, shift, big_n = self.num_inference_steps, self.shift, self.num_train_timesteps
    if self.sigma_schedule == "modjax":
      return flow_sigmas(n, shift)
    # diffusers __init__: float32 training sigmas, shifted; its sigma_min/max are their ends
    train = np.linspace(1, big_n, big_n, dtype=np.float32)[::-1] / np.float32(big_n)
    ends = (np.float32(shift) * train[[0, -1]]
            / (np.float32(1) + np.float32(shift - 1) * train[[0, -1]]))
    sigma_max, sigma_min = float(ends[0]), float(ends[1])
    # set_timesteps: float64 linspace of timesteps, shifted again, then float32
    s = np.linspace(sigma_max * big_n, sigma_min * big_n, n) / big_n
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s.astype(np.float32), np.zeros((1,), np.float32)])


# ---------------------------------------------------------------------------
# UniPC
# ---------------------------------------------------------------------------

class UniPCCarry(NamedTuple):
  """FlowUniPC's scan state; shapes fixed for the whole schedule.

  last_sample: float32 [*latents]: the sample the previous predictor started
    from (after its own correction), what the corrector redoes; zeros at step 0.
  history: float32 [solver_order, *latents]: previous x0 predictions, newest
    first: history[k] = m_{i-1-k} at the start of step i; zeros before they exist
    (their coefficients are zero until then).
  """
  last_sample: jax.Array
  history: jax.Array


def unipc_flow_sigmas(num_inference_steps: int, flow_shift: float, num_train_timesteps: int = 1000,
                      final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray]:
  """diffusers' UniPC `set_timesteps` with use_flow_sigmas=True, exactly.

  Returns (sigmas float32 [steps + 1], timesteps int64 [steps]). In float64:
  s = shift(linspace(1, 1 / N, steps + 1)[:-1]), s_0 -= 1e-6 when s_0 == 1 (to keep
  log(1 - sigma) finite), timesteps = int64(N s), truncated toward zero (so they
  are not round(N sigma), and long schedules repeat them: 1000 steps at shift 3
  give 731 distinct values). The last sigma is 0 ("zero") or s[-1] ("sigma_min":
  the last inference sigma, which makes the final step a zero-length step).
  """
  n, big_n = num_inference_steps, num_train_timesteps
  s = np.linspace(1, 1 / big_n, n + 1)[:-1]
  s = flow_shift * s / (1 + (flow_shift - 1) * s)
  if np.fabs(s[0] - 1) < 1e-6:
    s[0] -= 1e-6
  timesteps = (s * big_n).astype(np.int64)
  last = 0.0 if final_sigmas_type == "zero" else s[-1]
  return np.concatenate([s, [last]]).astype(np.float32), timesteps


def _unipc_orders(n: int, solver_order: int, lower_order_final: bool,
                  disable_corrector) -> tuple[np.ndarray, np.ndarray]:
  """Per step: the predictor's order, and the corrector's (0 where it is off).

  diffusers: this_order = min(solver_order, steps - i if lower_order_final,
  lower_order_nums + 1); the corrector at step i (i >= 1, i - 1 not in
  disable_corrector) has the previous step's order.
  """
  i = np.arange(n)
  order = np.minimum(solver_order, i + 1)
  if lower_order_final:
    order = np.minimum(order, n - i)
  corrector = np.zeros((n,), np.int64)
  off = set(int(k) for k in disable_corrector)
  for step in range(1, n):
    if step - 1 not in off:
      corrector[step] = order[step - 1]
  return order, corrector


def _b_vector(hh: float, b_h: float, order: int) -> np.ndarray:
  """diffusers' b_i = h phi_i(hh) i! / B(h), i = 1..order (phi_{k+1} = (phi_k - 1/k!) / hh)."""
  h_phi_1 = np.expm1(hh)
  h_phi_k = h_phi_1 / hh - 1
  factorial_i, b = 1, []
  for i in range(1, order + 1):
    b.append(h_phi_k * factorial_i / b_h)
    factorial_i *= i + 1
    h_phi_k = h_phi_k / hh - 1 / factorial_i
  return np.asarray(b)


def _bh_update(lam: np.ndarray, alpha: np.ndarray, sig: np.ndarray, t: int, s0: int, order: int,
               solver_type: str, corrector: bool):
  """Coefficients of one UniP (corrector=False) or UniC (True) update from sigma_s0 to sigma_t.

  diffusers, predict_x0=True, in x0 form with m0 = x0(s0), m_k = x0(s0 - k):
    x_t = sigma_t / sigma_s0 x - alpha_t phi1 m0
          - alpha_t B(h) [sum_k rho_k (m_k - m0) / r_k  (+ rho_last (m_t - m0) for UniC)]
  with h = lambda_t - lambda_s0, lambda = log(alpha / sigma), hh = -h, phi1 = expm1(hh),
  B(h) = hh (bh1) or expm1(hh) (bh2), r_k = (lambda_{s0-k} - lambda_s0) / h and the
  rhos from R rho = b (UniC: the full system, 0.5 at order 1; UniP: all but the
  last row and column, 0.5 at order 2).
  Returns (a, b, d [order - 1], d_t): x_t = a x + b m0 + sum_k d_k (m_k - m0) (+ d_t (m_t - m0)).
  """
  a = sig[t] / sig[s0]
  h = lam[t] - lam[s0]
  if h == 0:
    # a zero-length step ("sigma_min" makes the last one): x_t = x. diffusers gets
    # the same from 0 * (...) at orders 1-2 and NaN from solving with 0/0 at order 3.
    return 1.0, 0.0, np.zeros((order - 1,)), 0.0
  hh = -h
  h_phi_1 = np.expm1(hh)
  b0 = -alpha[t] * h_phi_1
  if order == 1 and not corrector:
    # UniP-1 has no residual term. Into sigma_t = 0 (h = inf) this gives x_t = m0;
    # there diffusers multiplies its zero residual by alpha_t B(h) = -inf under bh1
    # and returns NaN.
    return a, b0, np.zeros((0,)), 0.0
  b_h = hh if solver_type == "bh1" else np.expm1(hh)
  r = np.asarray([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0])
  if corrector:
    if order == 1:
      rhos = np.asarray([0.5])
    else:
      big_r = np.stack([r ** (i - 1) for i in range(1, order + 1)])
      rhos = np.linalg.solve(big_r, _b_vector(hh, b_h, order))
    d = -alpha[t] * b_h * rhos[:-1] / r[:-1]
    return a, b0, d, -alpha[t] * b_h * rhos[-1]
  if order == 2:
    rhos = np.asarray([0.5])
  else:
    big_r = np.stack([r ** (i - 1) for i in range(1, order + 1)])
    rhos = np.linalg.solve(big_r[:-1, :-1], _b_vector(hh, b_h, order)[:-1])
  return a, b0, -alpha[t] * b_h * rhos / r[:-1], 0.0


def _unipc_coefficients(sigmas32: np.ndarray, order: np.ndarray, corrector: np.ndarray,
                        solver_order: int, solver_type: str) -> dict[str, np.ndarray]:
  """All UniP/UniC coefficients of a schedule, float64, from diffusers' float32 sigmas.

  The steps apply them as increments, x + (c_x x + ...) with c_x = sigma_t / sigma_s0 - 1
  (x_t = a x + ... = x + ((a - 1) x + ...)): every term of the bracket is O(h), so
  it is summed first and rounded into x once. Adding the O(h^2) history terms to x
  one by one (as diffusers does) drops those below half an ulp of x: at 1000 steps
  that bias is ~2e-5 against a float64 run, 4x our error.
  """
  n = len(order)
  sig = sigmas32.astype(np.float64)
  alpha = 1.0 - sig
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sig)  # +inf at sigma = 0
  k = solver_order - 1
  out = {name: np.zeros((n,)) for name in ("c_x", "c_m0", "c_t", "p_x", "p_m0")}
  out["c_d"], out["p_d"] = np.zeros((n, k)), np.zeros((n, k))
  with np.errstate(divide="ignore", invalid="ignore"):
    for i in range(n):
      a, b0, d, _ = _bh_update(lam, alpha, sig, i + 1, i, int(order[i]), solver_type, False)
      out["p_x"][i], out["p_m0"][i], out["p_d"][i, :len(d)] = a - 1.0, b0, d
      if corrector[i]:
        a, b0, d, d_t = _bh_update(lam, alpha, sig, i, i - 1, int(corrector[i]), solver_type, True)
        out["c_x"][i], out["c_m0"][i], out["c_d"][i, :len(d)], out["c_t"][i] = a - 1.0, b0, d, d_t
  bad = [name for name, v in out.items() if not np.isfinite(v).all()]
  if bad:
    raise ValueError(f"UniPC coefficients {bad} are not finite for sigmas {sigmas32.tolist()}")
  return out


@dataclasses.dataclass(frozen=True)
class FlowUniPC:
  """diffusers' UniPCMultistepScheduler, prediction_type="flow_prediction", use_flow_sigmas=True.

  Wan2.1's scheduler_config.json is FlowUniPC(steps, flow_shift=3.0) (solver_order=2,
  bh2, lower_order_final, final sigma zero); diffusers recommends flow_shift 3.0
  at 480p and 5.0 at 720p.

  Supported: solver_order 1, 2, 3; solver_type "bh1", "bh2"; predict_x0=True
  only (diffusers raises for flow_prediction without it); final_sigmas_type
  "zero" or "sigma_min"; disable_corrector: step indices i whose predicted
  sample is not corrected (diffusers' meaning: the corrector at step i + 1 is off).
  Refused: lower_order_final=False with final_sigmas_type="zero" when the last
  step would have order > 1: that UniP step divides by log(0) (diffusers returns inf).
  """
  num_inference_steps: int
  flow_shift: float
  solver_order: int = 2
  solver_type: str = "bh2"
  lower_order_final: bool = True
  predict_x0: bool = True
  disable_corrector: tuple = ()
  final_sigmas_type: str = "zero"
  num_train_timesteps: int = 1000

  def __post_init__(self):
    n = _check_steps(self.num_inference_steps)
    object.__setattr__(self, "num_inference_steps", n)
    object.__setattr__(self, "flow_shift", _check_positive("flow_shift", self.flow_shift))
    if isinstance(self.solver_order, numbers.Integral) and not isinstance(self.solver_order, bool):
      object.__setattr__(self, "solver_order", int(self.solver_order))
    _check_choice("solver_order", self.solver_order, _SOLVER_ORDERS)
    _check_choice("solver_type", self.solver_type, _SOLVER_TYPES)
    _check_choice("final_sigmas_type", self.final_sigmas_type, _FINAL_SIGMAS_TYPES)
    _check_bool("lower_order_final", self.lower_order_final)
    _check_bool("predict_x0", self.predict_x0)
    if not self.predict_x0:
      raise ValueError("predict_x0 must be True: diffusers' UniPC supports flow_prediction "
                       "only on x0 predictions")
    disable = self.disable_corrector
    if isinstance(disable, (str, bytes)) or not isinstance(disable, (tuple, list)) or any(
        isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in disable):
      raise ValueError(f"disable_corrector must be a sequence of step indices (ints), got {disable!r}")
    object.__setattr__(self, "disable_corrector", tuple(int(k) for k in disable))
    # N = 1 makes every sigma 1 (alpha = 0)
    object.__setattr__(self, "num_train_timesteps",
                       _check_train_timesteps(self.num_train_timesteps, 2))
    object.__setattr__(self, "lower_order_final", bool(self.lower_order_final))
    if (not self.lower_order_final and self.final_sigmas_type == "zero"
        and min(self.solver_order, n) > 1):
      raise ValueError(
          f"lower_order_final=False with final_sigmas_type='zero' gives the last step order "
          f"{min(self.solver_order, n)}, whose UniP update to sigma=0 diverges (diffusers returns "
          f"inf); use lower_order_final=True, final_sigmas_type='sigma_min' or solver_order=1")

  def sigmas(self) -> np.ndarray:
    """float32 [steps + 1], diffusers' `scheduler.sigmas` after set_timesteps."""
    return unipc_flow_sigmas(self.num_inference_steps, self.flow_shift, self.num_train_timesteps,
                             self.final_sigmas_type)[0]

  def timesteps(self) -> np.ndarray:
    """float32 [steps]: diffusers' int64 `scheduler.timesteps` (int(N sigma), truncated)."""
    return unipc_flow_sigmas(self.num_inference_steps, self.flow_shift, self.num_train_timesteps,
                             self.final_sigmas_type)[1].astype(np.float32)

  def orders(self) -> tuple[np.ndarray, np.ndarray]:
    """int [steps] each: the predictor's order and the corrector's (0: no corrector)."""
    return _unipc_orders(self.num_inference_steps, self.solver_order, self.lower_order_final,
                         self.disable_corrector)

  def step_inputs(self) -> dict[str, np.ndarray]:
    """timestep, sigma [steps]; corrector (bool), c_x, c_m0, c_t [steps], c_d [steps, K-1];
    p_x, p_m0 [steps], p_d [steps, K-1] (K = solver_order); order, corrector_order
    (int32, for inspection; the step does not read them).

    With m = x - sigma v and history h[k] = m_{i-1-k}:
      corrected = last + (c_x last + c_m0 h[0] + c_t (m - h[0]) + sum_k c_d[k-1] (h[k] - h[0]))
      next = x + (p_x x + p_m0 m + sum_k p_d[k-1] (h[k-1] - m))
    c_x, p_x are sigma ratios minus 1; unused orders have zero coefficients."""
    sigmas, timesteps = unipc_flow_sigmas(self.num_inference_steps, self.flow_shift,
                                          self.num_train_timesteps, self.final_sigmas_type)
    if not (np.diff(sigmas[:-1]) < 0).all() or not (sigmas[:-1] > 0).all():
      raise ValueError(f"flow sigmas must decrease strictly and stay > 0, got {sigmas.tolist()} "
                       f"(flow_shift={self.flow_shift}, num_train_timesteps={self.num_train_timesteps})")
    order, corrector = self.orders()
    coef = _unipc_coefficients(sigmas, order, corrector, self.solver_order, self.solver_type)
    xs = {name: _f32(v) for name, v in coef.items()}
    xs.update(timestep=timesteps.astype(np.float32), sigma=sigmas[:-1], corrector=corrector > 0,
              order=order.astype(np.int32), corrector_order=corrector.astype(np.int32))
    return xs

  def init(self, latents: jax.Array) -> UniPCCarry:
    shape = jnp.shape(latents)
    return UniPCCarry(last_sample=jnp.zeros(shape, jnp.float32),
                      history=jnp.zeros((self.solver_order,) + tuple(shape), jnp.float32))

  def step(self, carry: UniPCCarry, latents, model_output, xs):
    """One step; reads only solver_order from self (everything else is in xs)."""
    x = latents.astype(jnp.float32)
    m = x - xs["sigma"] * model_output.astype(jnp.float32)  # x0 prediction
    hist = carry.history
    m0 = hist[0]
    # UniC: redo the previous step from last_sample with this step's x0 as well
    last = carry.last_sample
    inc = xs["c_x"] * last + xs["c_m0"] * m0 + xs["c_t"] * (m - m0)
    for k in range(1, self.solver_order):
      inc = inc + xs["c_d"][k - 1] * (hist[k] - m0)
    x = jnp.where(xs["corrector"], last + inc, x)
    # UniP from sigma_i to sigma_{i+1} on m_i, m_{i-1}, ...
    inc = xs["p_x"] * x + xs["p_m0"] * m
    for k in range(1, self.solver_order):
      inc = inc + xs["p_d"][k - 1] * (hist[k - 1] - m)
    nxt = x + inc
    history = jnp.concatenate([m[None], hist[:-1]], axis=0)
    return nxt, UniPCCarry(last_sample=x, history=history)


# ---------------------------------------------------------------------------
# diffusers configs
# ---------------------------------------------------------------------------

# Every __init__ argument of diffusers 0.42.1, with its default.
UNIPC_CONFIG_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
    rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    sigma_min=None, sigma_max=None, shift_terminal=None)

FLOW_MATCH_EULER_CONFIG_DEFAULTS = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
    shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)

_CLASSES = ("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler")


def _require(cfg: Mapping[str, Any], where: str, key: str, allowed: tuple) -> None:
  value = cfg[key]
  if not any(type(value) is type(a) and value == a for a in allowed):
    raise ValueError(f"{where}: {key}={value!r} is not supported; supported: {list(allowed)}")


def from_diffusers_config(config: Mapping[str, Any], num_inference_steps: int, *,
                          class_name: Optional[str] = None, **overrides):
  """A scheduler from a diffusers scheduler_config.json dict (as `Scheduler.from_config(config,
  **overrides)` would build it), then `set_timesteps(num_inference_steps)`.

  `_class_name` (or class_name, which replaces it: diffusers'
  `OtherScheduler.from_config(config)`) must be UniPCMultistepScheduler (-> FlowUniPC),
  FlowMatchEulerDiscreteScheduler (-> FlowEuler(sigma_schedule="diffusers")),
  CogVideoXDDIMScheduler (-> CogVideoXDDIM) or CogVideoXDPMScheduler (-> CogVideoXDPM;
  CogVideoX-5b's model card swaps the folder's DDIM config for it:
  `from_diffusers_config(cfg, 50, class_name="CogVideoXDPMScheduler")`).
  overrides: config keys; `flow_shift` is also accepted for the Euler class, where
  it sets `shift` (the pipeline passes 3.0 at 480p, 5.0 at 720p).
  Keys that do not change the math under the supported options (betas,
  thresholding ratios, steps_offset, timestep_spacing -- set_timesteps overwrites
  its timesteps with the flow ones -- dynamic-shift bounds, ...) are accepted;
  unknown keys and unsupported values raise ValueError naming them.
  """
  from models.weights import parse_config  # lazy: keeps this module numpy + jax on import

  if class_name is None:
    class_name = config.get("_class_name")
  if class_name in _COGVIDEOX_CLASSES:
    return _cogvideox_from_config({**config, **overrides}, num_inference_steps, class_name)
  if class_name not in _CLASSES:
    raise ValueError(f"scheduler config: _class_name must be one of "
                     f"{list(_CLASSES) + list(_COGVIDEOX_CLASSES)}, got {class_name!r}")
  where = f"{class_name} config"
  raw = dict(config)
  overrides = dict(overrides)
  if class_name == "FlowMatchEulerDiscreteScheduler" and "flow_shift" in overrides:
    overrides["shift"] = overrides.pop("flow_shift")
  raw.update(overrides)

  if class_name == "FlowMatchEulerDiscreteScheduler":
    cfg = parse_config(raw, FLOW_MATCH_EULER_CONFIG_DEFAULTS, where=where, class_names=_CLASSES)
    for key in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"):
      _require(cfg, where, key, (False,))
    _require(cfg, where, "shift_terminal", (None,))
    _require(cfg, where, "time_shift_type", ("exponential", "linear"))
    try:
      return FlowEuler(num_inference_steps, shift=cfg["shift"], sigma_schedule="diffusers",
                       num_train_timesteps=cfg["num_train_timesteps"])
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  cfg = parse_config(raw, UNIPC_CONFIG_DEFAULTS, where=where, class_names=_CLASSES)
  _require(cfg, where, "prediction_type", ("flow_prediction",))
  _require(cfg, where, "use_flow_sigmas", (True,))
  for key in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
              "use_dynamic_shifting"):
    _require(cfg, where, key, (False,))
  for key in ("solver_p", "shift_terminal"):
    _require(cfg, where, key, (None,))
  _require(cfg, where, "timestep_spacing", ("linspace", "leading", "trailing"))
  if cfg["trained_betas"] is None:  # diffusers' __init__ rejects other schedules
    _require(cfg, where, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
  solver_type = cfg["solver_type"]
  if solver_type in ("midpoint", "heun", "logrho"):  # diffusers' __init__ maps these to bh2
    solver_type = "bh2"
  try:
    return FlowUniPC(
        num_inference_steps, flow_shift=cfg["flow_shift"], solver_order=cfg["solver_order"],
        solver_type=solver_type, lower_order_final=cfg["lower_order_final"],
        predict_x0=cfg["predict_x0"], disable_corrector=cfg["disable_corrector"],
        final_sigmas_type=cfg["final_sigmas_type"], num_train_timesteps=cfg["num_train_timesteps"])
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def scan_schedule(scheduler, model_fn, latents: jax.Array, *, xs: Optional[Mapping[str, Any]] = None,
                  extra_xs: Optional[Mapping[str, Any]] = None, unroll: int = 1):
  """Runs a whole schedule in one `lax.scan`: model_fn(latents, timestep, extra) -> velocity.

  A reference loop for tests and small scripts (the sampler builds its own scan
  around the attention policy). xs: the scheduler's step inputs (default
  `scheduler.step_inputs()`); pass them as jit arguments to reuse one compile for
  every schedule of the same structure (the traced step of FlowUniPC depends only
  on solver_order). extra_xs: more per-step inputs, handed to model_fn. Returns
  (final latents, latents after every step [steps, *latents]).
  """
  xs = dict(sched=jax.tree.map(jnp.asarray, dict(scheduler.step_inputs() if xs is None else xs)),
            extra=jax.tree.map(jnp.asarray, dict(extra_xs or {})))

  def body(carry, xs):
    x, sc = carry
    v = model_fn(x, xs["sched"]["timestep"], xs["extra"])
    x, sc = scheduler.step(sc, x, v, xs["sched"])
    return (x, sc), x

  latents = jnp.asarray(latents, jnp.float32)
  (x, _), path = jax.lax.scan(body, (latents, scheduler.init(latents)), xs, unroll=unroll)
  return x, path


# ---------------------------------------------------------------------------
# Pipelines that hand FlowMatchEulerDiscreteScheduler their own sigmas
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FlowEulerLinspace(_EulerStep):
  """diffusers' `FlowMatchEulerDiscreteScheduler` after
  `set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])`: what
  `HunyuanVideoPipeline` (diffusers 0.42.1) does; `from_diffusers_config` gives
  `set_timesteps(steps)` instead, a different schedule.

  In float32, as diffusers: s = float32(linspace(1, 0, steps + 1)[:-1]), sigma =
  shift s / (1 + (shift - 1) s), then a final 0; timestep N sigma. This is
  FlowEuler's "modjax" schedule computed in float32 rather than float64 (they differ
  by at most 2 ulp). The step is FlowEuler's.
  """
  num_inference_steps: int
  shift: float
  num_train_timesteps: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "num_inference_steps", _check_steps(self.num_inference_steps))
    object.__setattr__(self, "shift", _check_positive("shift", self.shift))
    object.__setattr__(self, "num_train_timesteps",
                       _check_train_timesteps(self.num_train_timesteps, 1))

  def sigmas(self) -> np.ndarray:
    """float32 [steps + 1]: sigma_0 = 1 > ... > sigma_steps = 0."""
    s = np.linspace(1.0, 0.0, self.num_inference_steps + 1)[:-1].astype(np.float32)
    s = self.shift * s / (1 + (self.shift - 1) * s)  # float32 arithmetic, as diffusers
    return np.concatenate([s.astype(np.float32), np.zeros((1,), np.float32)])



def hunyuan_video_scheduler(config: Mapping[str, Any], num_inference_steps: int,
                            **overrides) -> FlowEulerLinspace:
  """HunyuanVideoPipeline's stepper from its scheduler_config.json dict: the config is
  checked as `from_diffusers_config` checks it (FlowMatchEulerDiscreteScheduler only;
  overrides are config keys, `flow_shift` sets `shift`), and its shift and
  num_train_timesteps drive the pipeline's linspace sigmas (`FlowEulerLinspace`)."""
  if config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
    raise ValueError(f"HunyuanVideo scheduler config: _class_name must be "
                     f"'FlowMatchEulerDiscreteScheduler', got {config.get('_class_name')!r}")
  euler = from_diffusers_config(config, num_inference_steps, **overrides)
  return FlowEulerLinspace(euler.num_inference_steps, shift=euler.shift,
                           num_train_timesteps=euler.num_train_timesteps)


# ---------------------------------------------------------------------------
# CogVideoX: v-prediction DDIM and DPM-Solver++ (2M, SDE) on a discrete schedule
# ---------------------------------------------------------------------------
#
# diffusers 0.42.1 `CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`. These are
# not flow schedulers: the model sees the latents unscaled (init_noise_sigma = 1,
# scale_model_input is the identity), its input timestep is the integer training
# timestep t_i, and its output (v, or eps / x0 with prediction_type) is turned
# into x0 = sqrt(abar_t) x - sqrt(1 - abar_t) v by the step. Every coefficient
# depends on the schedule only and is precomputed here from diffusers' own
# alphas_cumprod (float64 for scaled_linear, float32 for the others, as in
# diffusers); the traced steps are a few multiply-adds.
#
# diffusers' quirks kept on purpose: the "previous" timestep of step i is
# t_i - N // n (not t_{i+1}, which differs when n does not divide N), with
# abar = 1 (set_alpha_to_one) below 0; the DPM history weight uses the actual
# previous timestep t_{i-1}; clip_sample, clip_sample_range, sample_max_value
# and eta are never read by diffusers' steps, so they are accepted and ignored.

_COGVIDEOX_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_COGVIDEOX_PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
_COGVIDEOX_SPACINGS = ("linspace", "leading", "trailing")


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar` (cosine), float32."""
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                     for i in range(n)], np.float32)


def cogvideox_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                             beta_end: float = 0.012, beta_schedule: str = "scaled_linear",
                             trained_betas=None, snr_shift_scale: float = 3.0,
                             rescale_betas_zero_snr: bool = True) -> np.ndarray:
  """diffusers' CogVideoX `alphas_cumprod` [N] in diffusers' dtype (float64 for
  scaled_linear, float32 otherwise): abar = cumprod(1 - beta), SNR-shifted
  abar / (s + (1 - s) abar), optionally rescaled to zero terminal SNR."""
  n = num_train_timesteps
  if trained_betas is not None:
    betas = np.asarray(trained_betas, np.float32)
  elif beta_schedule == "linear":
    betas = np.linspace(beta_start, beta_end, n).astype(np.float32)
  elif beta_schedule == "scaled_linear":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
  else:
    betas = _cosine_betas(n)
  dtype = betas.dtype.type
  # torch's CPU cumprod accumulates float32 in float64, rounding each product to float32
  abar = np.cumprod((dtype(1) - betas).astype(np.float64)).astype(betas.dtype)
  abar = abar / (dtype(snr_shift_scale) + dtype(1 - snr_shift_scale) * abar)
  if rescale_betas_zero_snr:
    root = np.sqrt(abar)
    root_0, root_t = root[0], root[-1]
    root = (root - root_t) * (root_0 / (root_0 - root_t))
    abar = root ** 2
  return abar.astype(betas.dtype)


def cogvideox_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                        timestep_spacing: str = "trailing", steps_offset: int = 0) -> np.ndarray:
  """diffusers' CogVideoX `set_timesteps`: int64 [steps], decreasing.

  ValueError where diffusers' schedule is broken: "trailing" gives one timestep
  too many (ending at -1, read as t = N - 1) for some step counts (61, 103, ...
  at N = 1000), and steps_offset can push "leading" past N - 1.
  """
  n, big_n = num_inference_steps, num_train_timesteps
  if timestep_spacing == "linspace":
    ts = np.linspace(0, big_n - 1, n).round()[::-1].copy().astype(np.int64)
  elif timestep_spacing == "leading":
    ts = (np.arange(0, n) * (big_n // n)).round()[::-1].copy().astype(np.int64) + steps_offset
  else:
    ts = np.round(np.arange(big_n, 0, -big_n / n)).astype(np.int64) - 1
  if len(ts) != n or ts.min() < 0 or ts.max() > big_n - 1:
    raise ValueError(
        f"timestep_spacing={timestep_spacing!r} with num_inference_steps={n}, "
        f"num_train_timesteps={big_n}, steps_offset={steps_offset} gives diffusers the timesteps "
        f"{ts.tolist()}: {len(ts)} of them, in [{ts.min()}, {ts.max()}], not {n} in "
        f"[0, {big_n - 1}]; choose another step count")
  return ts


@dataclasses.dataclass(frozen=True)
class _CogVideoXSchedule:
  """The fields and the schedule shared by CogVideoXDDIM and CogVideoXDPM.

  Defaults are the CogVideoX checkpoints' scheduler_config.json (v_prediction,
  scaled_linear 0.00085..0.012, SNR shift 3, zero terminal SNR, trailing
  spacing), not diffusers' constructor defaults (from_diffusers_config applies
  those to keys a config lacks).
  """
  num_inference_steps: int
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  trained_betas: Optional[tuple] = None
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = "v_prediction"
  timestep_spacing: str = "trailing"
  rescale_betas_zero_snr: bool = True
  snr_shift_scale: float = 3.0

  def __post_init__(self):
    name = type(self).__name__
    object.__setattr__(self, "num_train_timesteps",
                       _check_train_timesteps(self.num_train_timesteps, 2))
    n = _check_steps(self.num_inference_steps)
    if n > self.num_train_timesteps:
      raise ValueError(f"{name}: num_inference_steps={n} cannot exceed num_train_timesteps="
                       f"{self.num_train_timesteps}")
    object.__setattr__(self, "num_inference_steps", n)
    for field in ("beta_start", "beta_end", "snr_shift_scale"):
      object.__setattr__(self, field, _check_positive(field, getattr(self, field)))
    _check_choice("beta_schedule", self.beta_schedule, _COGVIDEOX_BETA_SCHEDULES)
    _check_choice("prediction_type", self.prediction_type, _COGVIDEOX_PREDICTION_TYPES)
    _check_choice("timestep_spacing", self.timestep_spacing, _COGVIDEOX_SPACINGS)
    for field in ("set_alpha_to_one", "rescale_betas_zero_snr"):
      _check_bool(field, getattr(self, field))
      object.__setattr__(self, field, bool(getattr(self, field)))
    if (isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, numbers.Integral)
        or self.steps_offset < 0):
      raise ValueError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
    object.__setattr__(self, "steps_offset", int(self.steps_offset))
    if self.trained_betas is not None:
      betas = self.trained_betas
      if (isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list))
          or len(betas) != self.num_train_timesteps
          or not all(isinstance(b, numbers.Real) and 0 < b < 1 for b in betas)):
        raise ValueError(f"trained_betas must be None or num_train_timesteps="
                         f"{self.num_train_timesteps} numbers in (0, 1)")
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in betas))
    abar = self.alphas_cumprod()
    if not (np.isfinite(abar).all() and (abar >= 0).all() and (abar < 1).all()):
      raise ValueError(f"{name}: alphas_cumprod must lie in [0, 1), got [{abar.min()}, "
                       f"{abar.max()}] (check the betas)")
    self.step_inputs()  # raises for broken spacings and non-finite coefficients

  def alphas_cumprod(self) -> np.ndarray:
    """[N] in diffusers' dtype (see `cogvideox_alphas_cumprod`)."""
    return cogvideox_alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end,
                                    self.beta_schedule, self.trained_betas, self.snr_shift_scale,
                                    self.rescale_betas_zero_snr)

  def int_timesteps(self) -> np.ndarray:
    """int64 [steps]: diffusers' `scheduler.timesteps`."""
    return cogvideox_timesteps(self.num_inference_steps, self.num_train_timesteps,
                               self.timestep_spacing, self.steps_offset)

  def timesteps(self) -> np.ndarray:
    """float32 [steps]: the model's timestep input (diffusers' integer timesteps)."""
    return self.int_timesteps().astype(np.float32)

  def _alphas(self):
    """float64 per step: abar_t, abar_prev (at t - N // n, or the final alpha), abar_back
    (at t_{i-1}; NaN at step 0), and whether step i uses the DPM history."""
    abar = self.alphas_cumprod().astype(np.float64)
    final = 1.0 if self.set_alpha_to_one else float(abar[0])
    ts = self.int_timesteps()
    prev = ts - self.num_train_timesteps // self.num_inference_steps
    a_t = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    a_back = np.concatenate([[np.nan], a_t[:-1]])
    second = (np.arange(len(ts)) > 0) & (prev >= 0)
    return a_t, a_prev, a_back, second

  def _x0_coefficients(self, a_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x0 = c_sample x + c_output model_output, per step."""
    if self.prediction_type == "v_prediction":
      return np.sqrt(a_t), -np.sqrt(1 - a_t)
    if self.prediction_type == "epsilon":
      with np.errstate(divide="ignore"):
        return 1 / np.sqrt(a_t), -np.sqrt(1 - a_t) / np.sqrt(a_t)
    return np.zeros_like(a_t), np.ones_like(a_t)

  def _finite(self, coef: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    bad = [k for k, v in coef.items() if not np.isfinite(v).all()]
    if bad:
      raise ValueError(f"{type(self).__name__}: coefficients {bad} are not finite for this "
                       f"schedule (prediction_type={self.prediction_type!r} at abar = 0?)")
    return {k: _f32(v) for k, v in coef.items()}


@dataclasses.dataclass(frozen=True)
class CogVideoXDDIM(_CogVideoXSchedule):
  """diffusers' CogVideoXDDIMScheduler (the scheduler_config.json of CogVideoX-2b/5b).

  Deterministic: x0 from the model output, then
  x_prev = sqrt((1 - abar_prev) / (1 - abar_t)) x + (sqrt(abar_prev) - sqrt(abar_t) a) x0.
  Carry: () (no history).
  """

  def step_inputs(self) -> dict[str, np.ndarray]:
    """timestep [steps]; c_sample, c_output (x0 from x and the model output); a, b
    (x_prev = a x + b x0)."""
    a_t, a_prev, _, _ = self._alphas()
    c_sample, c_output = self._x0_coefficients(a_t)
    a = np.sqrt((1 - a_prev) / (1 - a_t))
    b = np.sqrt(a_prev) - np.sqrt(a_t) * a
    xs = self._finite(dict(c_sample=c_sample, c_output=c_output, a=a, b=b))
    xs["timestep"] = self.timesteps()
    return xs

  def init(self, latents: jax.Array) -> tuple:
    del latents
    return ()

  def step(self, carry, latents, model_output, xs):
    x = latents.astype(jnp.float32)
    x0 = xs["c_sample"] * x + xs["c_output"] * model_output.astype(jnp.float32)
    return xs["a"] * x + xs["b"] * x0, carry


class CogVideoXDPMCarry(NamedTuple):
  """CogVideoXDPM's scan state.

  old_pred_original_sample: float32 [*latents], the previous step's x0 (zeros at
    step 0, where its weight is zero).
  key: the step noise's key; step i draws normal(fold_in(key, i)).
  """
  old_pred_original_sample: jax.Array
  key: jax.Array


@dataclasses.dataclass(frozen=True)
class CogVideoXDPM(_CogVideoXSchedule):
  """diffusers' CogVideoXDPMScheduler: DPM-Solver++(2M) in its SDE form, the
  scheduler CogVideoX's model cards recommend for 5b.

  With lambda = log sqrt(abar / (1 - abar)), h = lambda_prev - lambda_t:
    x0 = c_sample x + c_output model_output
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_{i-1}   (r = (lambda_t - lambda_{t_{i-1}}) / h),
        D = x0 at step 0 and where t - N // n < 0 (the last step)
    x_prev = sqrt((1 - abar_prev) / (1 - abar_t)) e^-h x - expm1(-2h) sqrt(abar_prev) D
             + sqrt(1 - abar_prev) sqrt(1 - e^-2h) noise
  The noise term is always on (diffusers draws it whatever eta is; on
  second-order steps it draws twice and uses the second draw). Our noise is
  normal(fold_in(key, i)) float32 with the key from `init(latents, key)`, so a
  run is reproducible from that key; the values differ from torch's generator
  (the tests hand diffusers our noise). The last step (abar_prev = 1) lands on
  x0 exactly, without noise.

  `stochastic` (a class attribute, absent from the other schedulers) tells a
  caller that `init` takes the noise key.
  """
  stochastic: ClassVar[bool] = True

  def step_inputs(self) -> dict[str, np.ndarray]:
    """timestep [steps]; index (int32, the noise's fold-in); c_sample, c_output; m_sample,
    m_denoised, m_noise (x_prev = m_sample x - m_denoised D + m_noise noise); d_new, d_old
    (D = d_new x0 - d_old x0_prev: 1, 0 on first-order steps); second_order (bool, for
    inspection)."""
    a_t, a_prev, a_back, second = self._alphas()
    c_sample, c_output = self._x0_coefficients(a_t)
    with np.errstate(divide="ignore", invalid="ignore"):
      lam = lambda a: np.log(np.sqrt(a / (1 - a)))
      h = lam(a_prev) - lam(a_t)
      m_sample = np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h)
      m_denoised = np.expm1(-2 * h) * np.sqrt(a_prev)
      m_noise = np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h))
      r = (lam(a_t) - lam(a_back)) / h
      d_new = np.where(second, 1 + 1 / (2 * r), 1.0)
      d_old = np.where(second, 1 / (2 * r), 0.0)
    xs = self._finite(dict(c_sample=c_sample, c_output=c_output, m_sample=m_sample,
                           m_denoised=m_denoised, m_noise=m_noise, d_new=d_new, d_old=d_old))
    xs.update(timestep=self.timesteps(), index=np.arange(self.num_inference_steps, dtype=np.int32),
              second_order=second)
    return xs

  def init(self, latents: jax.Array, key: Optional[jax.Array] = None) -> CogVideoXDPMCarry:
    """key: the noise key (a `jax.random.key`); None takes jax.random.key(0), so a
    caller that passes none gets the same noise sequence on every run."""
    if key is None:
      key = jax.random.key(0)
    return CogVideoXDPMCarry(old_pred_original_sample=jnp.zeros(jnp.shape(latents), jnp.float32),
                             key=key)

  def step(self, carry: CogVideoXDPMCarry, latents, model_output, xs):
    x = latents.astype(jnp.float32)
    x0 = xs["c_sample"] * x + xs["c_output"] * model_output.astype(jnp.float32)
    denoised = xs["d_new"] * x0 - xs["d_old"] * carry.old_pred_original_sample
    noise = jax.random.normal(jax.random.fold_in(carry.key, xs["index"]), x.shape, jnp.float32)
    nxt = xs["m_sample"] * x - xs["m_denoised"] * denoised + xs["m_noise"] * noise
    return nxt, carry._replace(old_pred_original_sample=x0)


# Every __init__ argument of diffusers 0.42.1's CogVideoXDDIMScheduler and
# CogVideoXDPMScheduler (the same list), with its default.
COGVIDEOX_CONFIG_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.0120, beta_schedule="scaled_linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", clip_sample_range=1.0, sample_max_value=1.0,
    timestep_spacing="leading", rescale_betas_zero_snr=False, snr_shift_scale=3.0)

_COGVIDEOX_CLASSES = {"CogVideoXDDIMScheduler": CogVideoXDDIM,
                      "CogVideoXDPMScheduler": CogVideoXDPM}


def _cogvideox_from_config(raw: Mapping[str, Any], num_inference_steps: int,
                           class_name: str) -> "CogVideoXDDIM | CogVideoXDPM":
  from models.weights import parse_config  # lazy: keeps this module numpy + jax on import

  where = f"{class_name} config"
  cfg = parse_config(raw, COGVIDEOX_CONFIG_DEFAULTS, where=where,
                     class_names=tuple(_COGVIDEOX_CLASSES))
  for key in ("clip_sample", "clip_sample_range", "sample_max_value"):  # never read by the step
    cfg.pop(key)
  betas = cfg.pop("trained_betas")
  try:
    return _COGVIDEOX_CLASSES[class_name](
        num_inference_steps, trained_betas=None if betas is None else tuple(betas), **cfg)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
