"""`CogVideoXPipeline`: prompt -> CogVideoX latents from a diffusers CogVideoX folder.

    pipe = CogVideoXPipeline.from_pretrained("CogVideoX-5b")
    out = pipe("a cat surfing a wave", attention=modjax.MODConfig())
    out.frames    # uint8 [49, 480, 720, 3] (decoded by our CogVideoX VAE)
    out.latents   # float32 [1, 16, 13, 60, 90]

The folder is the one diffusers' `CogVideoXPipeline.save_pretrained` writes (and
the hub's THUDM/CogVideoX-2b, -5b and CogVideoX1.5-5B repositories hold):
model_index.json, transformer/, text_encoder/ (T5 v1.1), tokenizer/ (with
tokenizer.json), scheduler/, and vae/ (AutoencoderKLCogVideoX, decoded by
models.cogvideox.decode); without vae/ the pipeline stops at the latents.

The call follows diffusers' CogVideoXPipeline: the same argument names, pixel
units and defaults (height, width and num_frames from the transformer's sample
size, 50 steps, guidance 6.0), prompts encoded raw to max_sequence_length=226 T5
tokens without an attention mask, the default negative prompt "", classifier-free
guidance when guidance_scale > 1, the folder's scheduler (CogVideoXDDIMScheduler or
CogVideoXDPMScheduler, as its scheduler_config.json names it) inside the one-scan
sampler, CogVideoX 1.5's latent frames padded at the front to a multiple of its
temporal patch and dropped after the loop. What differs: the initial noise comes
from `jax.random.key(seed)` (pass `latents=` for exact noise) and so does DPM's step
noise; sizes diffusers would round or crop are refused; use_dynamic_cfg and
precomputed prompt_embeds are not supported; self-attention over the joint
[text; video] sequence runs any modjax attention policy (MOD-DiT on the video blocks,
every text row and column kept).

The VAE decodes `latents / scaling_factor` two latent frames at a time (diffusers'
frame batching, with the causal convolutions' cache carried between chunks) and the
frames are post-processed as diffusers' VideoProcessor. The VAE's decode memory is
not part of the memory estimate (its weights are).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from models import cogvideox
from models import text as text_lib
from models.cogvideox import sampling
from models.weights import read_json
from modjax import config as cfg_lib
from modjax import memory, schedulers
from modjax import sampler as sampler_lib
from modjax import sharding as sharding_lib
from modjax.pipelines import arguments, denoise, estimates, folders
from modjax.pipelines.postprocess import to_uint8_frames
from modjax.pipelines.stages import Stages

PIPELINE_CLASS = "CogVideoXPipeline"
REQUIRED = ("transformer", "text_encoder", "tokenizer", "scheduler")
OPTIONAL = ("vae",)
VAE_TEMPORAL, VAE_SPATIAL = sampling.VAE_TEMPORAL, sampling.VAE_SPATIAL
MAX_SEQUENCE_LENGTH = sampling.MAX_SEQUENCE_LENGTH
NO_VAE = ("no frames: the folder has no vae/; `latents` are the denoised latents "
          "[B, C, F, H/8, W/8] (CogVideoX 1.5's padding frames dropped), to be decoded by a "
          "CogVideoX VAE as decode(latents / scaling_factor)")


@dataclasses.dataclass(frozen=True)
class CogVideoXOutput:
  """latents: float32 [B, C, F, H/8, W/8] after the last step (modjax's and the VAE's
  layout; diffusers' transformer and its output_type="latent" use [B, F, C, H, W]),
  CogVideoX 1.5's `padding_frames` leading frames dropped as diffusers drops them
  before decoding; not divided by the VAE's scaling factor.
  frames: uint8 [F, H, W, 3] for one prompt ([B, F, H, W, 3] for a list), decoded by our
    CogVideoX VAE; None when the folder has no vae/ (`note` says so).
  vae_scaling_factor: from vae/config.json, None without a vae/ folder.
  sampling: the denoising scan's `SampleOutput` (its latents keep the padding frames;
  per-step density and kinds, the attention policy's final state)."""
  latents: np.ndarray
  sparsity: float
  timings: dict
  sampling: sampler_lib.SampleOutput
  padding_frames: int = 0
  vae_scaling_factor: Optional[float] = None
  frames: Optional[np.ndarray] = None
  note: Optional[str] = NO_VAE


def _vae_factors(folder: Path) -> Optional[float]:
  """The VAE's scaling factor (None without vae/); ValueError unless its compression is
  the x8 spatial, x4 temporal of every CogVideoX VAE (the latent sizes assume it)."""
  config = folders.component_config(folder, "vae")
  if config is None:
    return None
  spatial = 2 ** (len(config.get("block_out_channels", (128, 256, 256, 512))) - 1)
  temporal = config.get("temporal_compression_ratio", 4)
  if (spatial, temporal) != (VAE_SPATIAL, VAE_TEMPORAL):
    raise ValueError(f"{str(folder / 'vae')!r}: a VAE of x{spatial} spatial and x{temporal} "
                     f"temporal compression is not supported; CogVideoX's is x{VAE_SPATIAL}, "
                     f"x{VAE_TEMPORAL}")
  return float(config.get("scaling_factor", 1.15258426))


class CogVideoXPipeline:
  """Text-to-video latents with a CogVideoX checkpoint: T5 -> joint-attention DiT scan."""

  def __init__(self, *, transformer_config, transformer_params, text_config, text_params,
               tokenizer, scheduler_config: dict, vae_scaling_factor: Optional[float] = None,
               vae_config=None, vae_params=None, name: str = "cogvideox", mesh=None):
    self.config = transformer_config
    self.family = cogvideox.CogVideoXFamily(transformer_config, text_len=MAX_SEQUENCE_LENGTH)
    self.mesh = mesh
    self.transformer_params = sharding_lib.resolve(mesh).place_params(transformer_params)
    self.text_config, self.text_params, self.tokenizer = text_config, text_params, tokenizer
    self.scheduler_config = dict(scheduler_config)
    self.vae_scaling_factor = vae_scaling_factor
    self.vae_config, self.vae_params = vae_config, vae_params
    self._decode = (None if vae_config is None else
                    jax.jit(lambda p, z: cogvideox.decode(vae_config, p, z)))
    self.name = name
    self._samplers = denoise.SamplerCache()

  @classmethod
  def from_pretrained(cls, folder, *, dtype: Optional[str] = None,
                      mesh=None) -> "CogVideoXPipeline":
    """Loads the transformer, the T5 encoder, the tokenizer and the scheduler config of a
    diffusers CogVideoX folder, and its VAE when vae/ is there.

    dtype: parameter and compute dtype of the transformer, the text encoder and the VAE,
    "bfloat16" or "float32"; default bfloat16 on accelerators, float32 on CPU.
    mesh: the denoiser's default mesh (see `modjax.sharding`); params are placed once.
    """
    folder = folders.pipeline_folder(folder, "CogVideoX")
    folders.check_model_index(folder, PIPELINE_CLASS, required=REQUIRED, optional=OPTIONAL)
    dtype = folders.resolve_dtype(dtype)
    transformer_config, transformer_params = cogvideox.load_diffusers_transformer(
        folder / "transformer", param_dtype=dtype, dtype=dtype)
    if transformer_config.in_channels != transformer_config.out_channels:
      raise ValueError(f"{str(folder)!r}: an image-to-video transformer (in_channels="
                       f"{transformer_config.in_channels}, out_channels="
                       f"{transformer_config.out_channels}); this pipeline is text-to-video")
    text_config, text_params = text_lib.load_text_encoder(folder / "text_encoder",
                                                           param_dtype=dtype, dtype=dtype)
    tokenizer = text_lib.Tokenizer.from_folder(folder / "tokenizer")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    if scheduler_config.get("_class_name") not in ("CogVideoXDDIMScheduler",
                                                   "CogVideoXDPMScheduler"):
      raise ValueError(f"{str(folder / 'scheduler')!r}: _class_name must be "
                       f"'CogVideoXDDIMScheduler' or 'CogVideoXDPMScheduler', got "
                       f"{scheduler_config.get('_class_name')!r}")
    schedulers.from_diffusers_config(scheduler_config, 1)  # validate now, not at the first call
    folders.check_text_width(folder, transformer_config.text_dim, text_config.d_model)
    scaling_factor = _vae_factors(folder)
    vae_config = vae_params = None
    if scaling_factor is not None:
      vae_config, vae_params = cogvideox.load_diffusers_vae(folder / "vae", dtype=dtype,
                                                            param_dtype=dtype)
    return cls(transformer_config=transformer_config, transformer_params=transformer_params,
               text_config=text_config, text_params=text_params, tokenizer=tokenizer,
               scheduler_config=scheduler_config, vae_scaling_factor=scaling_factor,
               vae_config=vae_config, vae_params=vae_params, name=folder.name, mesh=mesh)

  # ------------------------------------------------------------------ sizes

  def default_size(self) -> tuple[int, int, int]:
    """diffusers' defaults: (height, width, num_frames) of the transformer's sample size."""
    cfg = self.config
    return cfg.sample_height * VAE_SPATIAL, cfg.sample_width * VAE_SPATIAL, cfg.sample_frames

  def latent_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """(latent frames denoised, padding included; latent height; latent width)."""
    return (sampling.latent_frames(num_frames, self.config)[0],
            *sampling.latent_size(height, width, self.config))

  def _check_size(self, height, width, num_frames) -> tuple[tuple[int, int, int], int]:
    arguments.video_size(height, width, num_frames, spatial=VAE_SPATIAL, temporal=VAE_TEMPORAL,
                         patch=self.config.patch_size)
    frames, padding = sampling.latent_frames(num_frames, self.config)
    latent = (frames, *sampling.latent_size(height, width, self.config))
    try:
      self.family.check_latent_size(*latent)
    except ValueError as e:
      raise ValueError(f"height={height}, width={width}, num_frames={num_frames}: {e}") from None
    return latent, padding

  # ------------------------------------------------------------------ memory

  def memory_estimate(self, *, height: int, width: int, num_frames: int, batch: int = 1,
                      guidance: bool = True, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                      attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig()
                      ) -> memory.MemoryEstimate:
    """Device memory of one call at these sizes (see modjax.memory)."""
    cfg = self.config
    latent, _ = self._check_size(height, width, num_frames)
    rows = batch * (2 if guidance else 1)
    family = cogvideox.CogVideoXFamily(cfg, text_len=max_sequence_length)
    stages = {
        "text_encode": memory.text_encode_bytes(
            batch=rows, seq_len=max_sequence_length, d_model=self.text_config.d_model,
            d_ff=self.text_config.d_ff, heads=self.text_config.num_heads,
            dtype=self.text_config.dtype),
        "denoise": estimates.denoise_stage_bytes(
            family, latent, batch=batch, rows=rows, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
            cross_text_len=0, attention=attention),
    }
    weights = {"transformer": memory.tree_bytes(self.transformer_params),
               "text_encoder": memory.tree_bytes(self.text_params)}
    if self.vae_params is not None:
      weights["vae"] = memory.tree_bytes(self.vae_params)
    return memory.MemoryEstimate(weights=weights, stages=stages)

  # -------------------------------------------------------------------- call

  def encode_prompt(self, prompts: Sequence[str],
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> jax.Array:
    """[B, max_sequence_length, d_model] T5 embeddings, padding kept (diffusers' rule)."""
    return sampling.encode_prompts(self.text_config, self.text_params, self.tokenizer,
                                   list(prompts), max_length=max_sequence_length)

  def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt=None, *,
               height: Optional[int] = None, width: Optional[int] = None,
               num_frames: Optional[int] = None, num_inference_steps: int = 50,
               guidance_scale: float = 6.0, use_dynamic_cfg: bool = False,
               attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig(), seed: int = 0,
               latents=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
               callbacks: Sequence[Callable[[int, int], None]] = (),
               log: Optional[Callable[[str], None]] = None, check_memory: bool = True,
               mesh=None) -> CogVideoXOutput:
    """Sample video latents for the prompts. Sizes in pixels and frames, as diffusers.

    height, width, num_frames: None takes diffusers' default, the transformer's sample
      size (480 x 720 x 49 for CogVideoX-5b); height and width must be multiples of
      8 x patch_size, num_frames 4k+1.
    guidance_scale: classifier-free guidance, >= 1 (1 disables it and the negative prompt).
    use_dynamic_cfg: only False (diffusers' default); the sampler's guidance is constant.
    attention: any modjax attention config (DenseConfig, MODConfig, baselines).
    seed: the run key: initial noise (unless latents is given) and DPM's step noise.
    latents: optional initial noise float32 [B, C, F', H/8, W/8] in modjax's layout,
      F' the latent frames with CogVideoX 1.5's padding (diffusers' is [B, F', C, H, W]).
    max_sequence_length: T5 tokens per prompt (226, what the checkpoints were trained on).
    callbacks: host fn(step, num_steps) after each denoising step (progress bars).
    log: called with one line per stage (its time included), e.g. print.
    check_memory: refuse before compiling when the estimate exceeds the device's memory.
    mesh: run the denoising loop over a mesh (see `modjax.sharding`); None: the
      pipeline's mesh, else one device.
    """
    mesh = self.mesh if mesh is None else mesh
    prompts, negatives = arguments.prompts(prompt, negative_prompt)
    default_h, default_w, default_f = self.default_size()
    height = default_h if height is None else height
    width = default_w if width is None else width
    num_frames = default_f if num_frames is None else num_frames
    latent, padding = self._check_size(height, width, num_frames)
    arguments.positive_int("num_inference_steps", num_inference_steps)
    guidance_scale = arguments.guidance_scale(guidance_scale)
    if use_dynamic_cfg is not False:
      raise ValueError(f"use_dynamic_cfg must be False (dynamic guidance is not supported: the "
                       f"sampler's guidance scale is constant), got {use_dynamic_cfg!r}")
    seed = arguments.seed(seed)
    max_sequence_length = arguments.positive_int("max_sequence_length", max_sequence_length)
    batch = len(prompts)
    noise = arguments.latents(latents, (batch, self.config.in_channels, *latent))
    guidance = guidance_scale > 1.0
    scheduler = schedulers.from_diffusers_config(self.scheduler_config, num_inference_steps)
    settings = sampler_lib.SamplerSettings(
        frames=latent[0], height=latent[1], width=latent[2],
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        attention=attention, scheduler=scheduler)
    family = cogvideox.CogVideoXFamily(self.config, text_len=max_sequence_length)
    if check_memory:
      estimates.check(self.memory_estimate(height=height, width=width, num_frames=num_frames,
                                           batch=batch, guidance=guidance,
                                           max_sequence_length=max_sequence_length,
                                           attention=attention),
                      f"{num_frames}x{height}x{width} ({batch} video(s))", mesh)
    stages = Stages(log)

    with stages("text_encode"):
      context = self.encode_prompt(prompts, max_sequence_length)
      neg = (self.encode_prompt(negatives, max_sequence_length) if guidance
             else jnp.zeros_like(context))
      jax.block_until_ready((context, neg))
    stages.say(f"text encoding {stages.timings['text_encode']:.1f} s ({batch} prompt(s), "
               f"{max_sequence_length} tokens)")

    dtype = family.dtype
    out, sparsity = denoise.denoise(
        self._samplers, family, settings, self.transformer_params, context.astype(dtype),
        neg.astype(dtype), denoise.run_key(seed), None if noise is None else jnp.asarray(noise),
        stages=stages, callbacks=callbacks, mesh=mesh, describe=type(scheduler).__name__)
    z = np.asarray(jax.device_get(out.latents))[:, :, padding:]
    if self._decode is None:
      stages.say(f"latents {tuple(z.shape)} (the folder has no vae/: no frames)")
      return CogVideoXOutput(latents=z, sparsity=sparsity, timings=stages.timings,
                             sampling=out, padding_frames=padding)
    with stages("vae_decode"):
      scaled = jnp.asarray(z / self.vae_scaling_factor, self.vae_config.dtype)
      video = np.asarray(jax.device_get(self._decode(self.vae_params, scaled)))
    stages.say(f"VAE decode {stages.timings['vae_decode']:.1f} s (compile included) -> "
               f"{video.shape[2]} frames of {video.shape[3]}x{video.shape[4]}")
    frames = to_uint8_frames(video)
    if isinstance(prompt, str):
      frames = frames[0]
    return CogVideoXOutput(latents=z, sparsity=sparsity, timings=stages.timings, sampling=out,
                           padding_frames=padding, vae_scaling_factor=self.vae_scaling_factor,
                           frames=frames, note=None)
