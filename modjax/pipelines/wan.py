"""`WanPipeline`: prompt -> video frames from a diffusers Wan2.1 folder, all in JAX.

    pipe = WanPipeline.from_pretrained("Wan2.1-T2V-1.3B-Diffusers")
    frames = pipe("a cat surfing a wave", attention=modjax.MODConfig()).frames  # uint8 [F, H, W, 3]

The folder is the one diffusers' `WanPipeline.save_pretrained` writes (and the
hub's Wan-AI/Wan2.1-T2V-*-Diffusers repositories hold): model_index.json,
transformer/, vae/, text_encoder/ (UMT5), tokenizer/ (tokenizer.json),
scheduler/ (scheduler_config.json). The call follows diffusers' WanPipeline:
the same argument names and pixel units, prompts cleaned and encoded to 512
tokens with the embeddings zeroed past each prompt's length, the default
negative prompt "", classifier-free guidance when guidance_scale > 1, the
folder's scheduler (UniPC with flow prediction) with flow_shift 3.0 at 480p and
5.0 at 720p unless given, latents de-normalised with the VAE's latents_mean/std
and decoded chunk by chunk. What differs: the initial noise comes from
`jax.random.key(seed)` (pass `latents=` for exact noise), sizes that diffusers
would round are refused, and self-attention runs any modjax attention policy
(dense, MOD-DiT, the baselines).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from models import text as text_lib
from models import wan
from models.wan import vae as vae_lib
from models.weights import read_json
from modjax import config as cfg_lib
from modjax import memory, schedulers
from modjax import sampler as sampler_lib
from modjax import sharding as sharding_lib
from modjax.pipelines import arguments, denoise, estimates, folders
from modjax.pipelines.postprocess import to_uint8_frames
from modjax.pipelines.stages import Stages

PIPELINE_CLASS = "WanPipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# model_index.json entries that are not components, with the only values we run.
_INDEX_FIXED = {"boundary_ratio": None, "expand_timesteps": False}
_INDEX_OPTIONAL_EMPTY = ("transformer_2",)   # Wan2.2's second transformer: must be absent/null
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
MAX_SEQUENCE_LENGTH = 512


def recommended_flow_shift(height: int, width: int) -> float:
  """diffusers' advice for Wan2.1: 5.0 for 720p, 3.0 for 480p (and smaller)."""
  return 5.0 if height * width >= 720 * 1280 * 0.75 else 3.0


@dataclasses.dataclass(frozen=True)
class WanOutput:
  """frames: uint8 [F, H, W, 3] for one prompt ([B, F, H, W, 3] for a list);
  latents: float32 [B, 16, T, H/8, W/8] before the VAE; timings: seconds by stage;
  sampling: the denoising scan's `SampleOutput` (per-step density and kinds, the final
  attention-policy state, e.g. MOD-DiT's masks, for `modjax.plotting`)."""
  frames: np.ndarray
  latents: np.ndarray
  sparsity: float
  flow_shift: float
  timings: dict
  sampling: sampler_lib.SampleOutput


def _check_index(folder: Path) -> dict:
  return folders.check_model_index(
      folder, PIPELINE_CLASS, required=COMPONENTS,
      fixed={k: (v, "Wan2.2 options") for k, v in _INDEX_FIXED.items()},
      must_be_empty={k: "Wan2.2" for k in _INDEX_OPTIONAL_EMPTY})


def _validate_call(prompt, negative_prompt, height, width, num_frames, num_inference_steps,
                   guidance_scale, seed, patch_hw):
  prompts, negatives = arguments.prompts(prompt, negative_prompt)
  arguments.video_size(height, width, num_frames, spatial=VAE_SPATIAL, temporal=VAE_TEMPORAL,
                       patch=patch_hw)
  arguments.positive_int("num_inference_steps", num_inference_steps)
  arguments.guidance_scale(guidance_scale)
  arguments.seed(seed)
  return prompts, negatives


class WanPipeline:
  """Text-to-video with a Wan2.1 checkpoint: UMT5 -> DiT denoising scan -> Wan VAE."""

  def __init__(self, *, transformer_config, transformer_params, text_config, text_params,
               tokenizer, vae_config, vae_params, scheduler_config: dict, name: str = "wan",
               mesh=None):
    self.family = wan.WanFamily(transformer_config)
    # the denoiser's default mesh (None: one device); its params live there
    self.mesh = mesh
    self.transformer_params = sharding_lib.resolve(mesh).place_params(transformer_params)
    self.text_config, self.text_params, self.tokenizer = text_config, text_params, tokenizer
    self.vae_config, self.vae_params = vae_config, vae_params
    self.scheduler_config = dict(scheduler_config)
    self.name = name
    self._decode = jax.jit(lambda p, z: vae_lib.decode(vae_config, p, z))
    self._samplers = denoise.SamplerCache()

  @classmethod
  def from_pretrained(cls, folder, *, dtype: Optional[str] = None, mesh=None) -> "WanPipeline":
    """Loads every component of a diffusers Wan2.1 folder.

    mesh: the denoiser's default mesh (`modjax.sharding.make_mesh` or a
    `modjax.sharding.Parallel`, e.g. with shard_weights=True for 14B); the
    transformer's params are placed on it once, here.

    dtype: parameter and compute dtype of the transformer and text encoder,
    "bfloat16" or "float32"; default bfloat16 on accelerators, float32 on CPU.
    The VAE computes in float32 (its weights are small).
    """
    folder = folders.pipeline_folder(folder, "Wan2.1")
    _check_index(folder)
    dtype = folders.resolve_dtype(dtype)
    transformer_config, transformer_params = wan.load_diffusers_transformer(
        folder / "transformer", param_dtype=dtype, dtype=dtype)
    text_config, text_params = text_lib.load_text_encoder(folder / "text_encoder",
                                                           param_dtype=dtype, dtype=dtype)
    tokenizer = text_lib.Tokenizer.from_folder(folder / "tokenizer")
    vae_config, vae_params = wan.load_diffusers_vae(folder / "vae")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    schedulers.from_diffusers_config(scheduler_config, 1)  # validate now, not at the first call
    folders.check_text_width(folder, transformer_config.text_dim, text_config.d_model)
    return cls(transformer_config=transformer_config, transformer_params=transformer_params,
               text_config=text_config, text_params=text_params, tokenizer=tokenizer,
               vae_config=vae_config, vae_params=vae_params, scheduler_config=scheduler_config,
               name=folder.name, mesh=mesh)

  # ------------------------------------------------------------------ memory

  def memory_estimate(self, *, height: int, width: int, num_frames: int, batch: int = 1,
                      guidance: bool = True,
                      attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig()
                      ) -> memory.MemoryEstimate:
    """Device memory of one call at these sizes (see modjax.memory)."""
    cfg = self.family.config
    latent = self.latent_size(height, width, num_frames)
    rows = batch * (2 if guidance else 1)
    stages = {
        "text_encode": memory.text_encode_bytes(
            batch=rows, seq_len=MAX_SEQUENCE_LENGTH, d_model=self.text_config.d_model,
            d_ff=self.text_config.d_ff, heads=self.text_config.num_heads,
            dtype=self.text_config.dtype),
        "denoise": estimates.denoise_stage_bytes(
            self.family, latent, batch=batch, rows=rows, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
            cross_text_len=MAX_SEQUENCE_LENGTH, attention=attention),
        "vae_decode": vae_lib.decode_memory_bytes(
            self.vae_config, (batch, self.vae_config.z_dim, *latent), self.vae_config.dtype),
    }
    weights = {"transformer": memory.tree_bytes(self.transformer_params),
               "text_encoder": memory.tree_bytes(self.text_params),
               "vae": memory.tree_bytes(self.vae_params)}
    return memory.MemoryEstimate(weights=weights, stages=stages)

  def latent_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    return (num_frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL

  # -------------------------------------------------------------------- call

  def encode_prompt(self, prompts: Sequence[str]) -> jax.Array:
    """[B, 512, d_model] embeddings, zero past each prompt's length (diffusers' rule)."""
    return text_lib.encode_prompts(self.text_config, self.text_params, self.tokenizer,
                                   list(prompts), max_length=MAX_SEQUENCE_LENGTH)

  def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt=None, *,
               height: int = 480, width: int = 832, num_frames: int = 81,
               num_inference_steps: int = 50, guidance_scale: float = 5.0,
               attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig(), seed: int = 0,
               flow_shift: Optional[float] = None, latents=None,
               callbacks: Sequence[Callable[[int, int], None]] = (),
               log: Optional[Callable[[str], None]] = None, check_memory: bool = True,
               mesh=None) -> WanOutput:
    """Sample videos for the prompts. Sizes in pixels and frames, as diffusers.

    attention: any modjax attention config (DenseConfig, MODConfig, baselines).
    flow_shift: the scheduler's shift; None picks diffusers' advice
      (`recommended_flow_shift`: 3.0 at 480p, 5.0 at 720p).
    latents: optional initial noise float32 [B, 16, T, H/8, W/8] (else from seed).
    callbacks: host fn(step, num_steps) after each denoising step (progress bars).
    log: called with one line per stage (its time included), e.g. print.
    check_memory: refuse before compiling when the estimate exceeds the device's memory
      (the one-device estimate; skipped on a mesh of more than one device).
    mesh: run the denoising loop over a mesh (`modjax.sharding.make_mesh`, or a
      `modjax.sharding.Parallel` for head balancing / FSDP options); None: the
      pipeline's mesh (from_pretrained), else one device. A mesh other than the
      pipeline's copies the params onto it at each call. Text encoding and VAE
      decoding stay on the default device.
    """
    mesh = self.mesh if mesh is None else mesh
    prompts, negatives = _validate_call(prompt, negative_prompt, height, width, num_frames,
                                        num_inference_steps, guidance_scale, seed,
                                        self.family.config.patch_size[1])
    if flow_shift is None:
      flow_shift = recommended_flow_shift(height, width)
    flow_shift = arguments.positive_float("flow_shift", flow_shift)
    guidance = guidance_scale > 1.0
    latent = self.latent_size(height, width, num_frames)
    batch = len(prompts)
    noise = arguments.latents(latents, (batch, self.family.config.in_channels, *latent))
    scheduler = schedulers.from_diffusers_config(self.scheduler_config, num_inference_steps,
                                                 flow_shift=flow_shift)
    settings = sampler_lib.SamplerSettings(
        frames=latent[0], height=latent[1], width=latent[2],
        num_inference_steps=num_inference_steps, guidance_scale=float(guidance_scale),
        attention=attention, scheduler=scheduler)
    if check_memory:
      estimates.check(self.memory_estimate(height=height, width=width, num_frames=num_frames,
                                           batch=batch, guidance=guidance, attention=attention),
                      f"{num_frames}x{height}x{width} ({batch} video(s))", mesh)
    stages = Stages(log)

    with stages("text_encode"):
      context = self.encode_prompt(prompts)
      neg = self.encode_prompt(negatives) if guidance else jnp.zeros_like(context)
      jax.block_until_ready((context, neg))
    stages.say(f"text encoding {stages.timings['text_encode']:.1f} s ({batch} prompt(s), "
               f"{MAX_SEQUENCE_LENGTH} tokens)")

    dtype = self.family.dtype
    out, sparsity = denoise.denoise(
        self._samplers, self.family, settings, self.transformer_params, context.astype(dtype),
        neg.astype(dtype), denoise.run_key(seed), None if noise is None else jnp.asarray(noise),
        stages=stages, callbacks=callbacks, mesh=mesh, describe=f"flow_shift {flow_shift}")

    with stages("vae_decode"):
      z = jax.device_put(out.latents, jax.devices()[0])  # off the mesh: the VAE runs on one device
      video = self._decode(self.vae_params, vae_lib.denormalize_latents(self.vae_config, z))
      video = np.asarray(jax.block_until_ready(video))
    stages.say(f"VAE decode {stages.timings['vae_decode']:.1f} s (compile included) -> "
               f"{video.shape[2]} frames of {video.shape[3]}x{video.shape[4]}")
    frames = to_uint8_frames(video)
    if isinstance(prompt, str):
      frames = frames[0]
    return WanOutput(frames=frames, latents=np.asarray(z), sparsity=sparsity,
                     flow_shift=flow_shift, timings=stages.timings, sampling=out)
