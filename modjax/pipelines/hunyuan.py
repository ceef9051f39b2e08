"""`HunyuanVideoPipeline`: precomputed prompt embeddings -> HunyuanVideo latents, from a
diffusers HunyuanVideo folder.

    pipe = HunyuanVideoPipeline.from_pretrained("HunyuanVideo")
    out = pipe(prompt_embeds=embeds, prompt_attention_mask=mask,
               pooled_prompt_embeds=pooled, attention=modjax.MODConfig())
    out.latents   # float32 [1, 16, 33, 90, 160]; out.frames is None (no JAX VAE)

The folder is the one diffusers' `HunyuanVideoPipeline.save_pretrained` writes (and
the hub's hunyuanvideo-community/HunyuanVideo holds): model_index.json,
transformer/, scheduler/. Only those two are read: the text encoders
(LLaVA-Llama-3-8B and CLIP ViT-L/14, with their tokenizers) and the VAE are not
ported, so their folders may be there or not. The call therefore takes the
prompt embeddings precomputed, exactly as diffusers' pipeline accepts them:
prompt_embeds [B, L, 4096] (the Llama hidden states, L = 256 after the prompt
template is cropped), prompt_attention_mask [B, L] (1 on the real tokens, which
come first, then 0 on padding) and pooled_prompt_embeds [B, 768] (CLIP's pooled
output); diffusers' `HunyuanVideoPipeline.encode_prompt(prompt)` gives all three.

The call follows diffusers' HunyuanVideoPipeline: the same argument names, pixel
units and defaults (720 x 1280, 129 frames, 50 steps), guidance_scale as the
embedded guidance of the guidance-distilled model (guidance_scale * 1000, default
6.0; no classifier-free guidance), the folder's FlowMatchEulerDiscreteScheduler
with its shift on the pipeline's linspace sigmas, inside the one-scan sampler.
What differs: the initial noise comes from `jax.random.key(seed)` (pass `latents=`
for exact noise); sizes diffusers would round or crop are refused; true CFG
(true_cfg_scale with negative embeddings), custom sigmas and num_videos_per_prompt
are not supported. Self-attention over the joint [video; text] sequence runs any
modjax attention policy: the text padding is dropped first (an attention control
takes no key mask; the padded tokens never reach a real one, so the prediction is
the same), and prompts of different real lengths run as one sampler call per
length.

To get videos, decode the latents with diffusers' HunyuanVideo VAE:
`vae.decode(torch.from_numpy(out.latents) / vae.config.scaling_factor).sample`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import hunyuan
from models.weights import read_json
from modjax import config as cfg_lib
from modjax import memory, schedulers
from modjax import sampler as sampler_lib
from modjax import sharding as sharding_lib
from modjax.pipelines import arguments, denoise, estimates, folders
from modjax.pipelines.stages import Stages

PIPELINE_CLASS = "HunyuanVideoPipeline"
REQUIRED = ("transformer", "scheduler")
NOT_PORTED = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
VAE_TEMPORAL, VAE_SPATIAL = 4, 8
NO_VAE = ("no frames: modjax has no HunyuanVideo VAE; `latents` are the denoised latents "
          "[B, C, F, H/8, W/8], to be decoded with diffusers' AutoencoderKLHunyuanVideo as "
          "vae.decode(latents / vae.config.scaling_factor)")
NO_TEXT_ENCODERS = (
    "the HunyuanVideo text encoders (LLaVA-Llama-3 and CLIP) are not ported to modjax: pass "
    "prompt_embeds, prompt_attention_mask and pooled_prompt_embeds instead (diffusers' "
    "HunyuanVideoPipeline.encode_prompt(prompt) gives all three)")


@dataclasses.dataclass(frozen=True)
class HunyuanVideoOutput:
  """latents: float32 [B, C, F, H/8, W/8] after the last step (diffusers' latent layout),
  not divided by the VAE's scaling factor.
  frames: always None -- there is no JAX HunyuanVideo VAE (`note` says so).
  sampling: one `SampleOutput` per sampler call (per-step density and kinds, the
  attention policy's final state), `text_lengths` the real prompt length of each call
  and `rows` the prompts (batch rows) it ran: prompts of one real length share a call,
  so one prompt is one call.
  flow_shift: the scheduler's shift used; vae_scaling_factor from vae/config.json, None
  without a vae/ folder."""
  latents: np.ndarray
  sparsity: float
  timings: dict
  sampling: tuple
  text_lengths: tuple
  rows: tuple
  flow_shift: float
  vae_scaling_factor: Optional[float] = None
  frames: None = None
  note: str = NO_VAE


def _vae_scaling_factor(folder: Path) -> Optional[float]:
  config = folders.component_config(folder, "vae")
  if config is None:
    return None
  factors = (config.get("spatial_compression_ratio", 8), config.get("temporal_compression_ratio", 4))
  if factors != (VAE_SPATIAL, VAE_TEMPORAL):
    raise ValueError(f"{str(folder / 'vae')!r}: a VAE of x{factors[0]} spatial and x{factors[1]} "
                     f"temporal compression is not supported; HunyuanVideo's is x{VAE_SPATIAL}, "
                     f"x{VAE_TEMPORAL}")
  return float(config.get("scaling_factor", 0.476986))


def _text_mask(value, shape) -> np.ndarray:
  """prompt_attention_mask as bool [B, L]: 0/1 (any dtype) or bool."""
  mask = arguments.host_array("prompt_attention_mask", value)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"prompt_attention_mask must be [B, L] = {tuple(shape)} (as prompt_embeds), "
                     f"got shape {tuple(mask.shape)}")
  if not np.isin(mask, (0, 1)).all():
    raise ValueError("prompt_attention_mask must hold 0 (padding) and 1 (real tokens) only")
  mask = mask != 0
  lengths = mask.sum(axis=1)
  if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
    raise ValueError("prompt_attention_mask must hold the real tokens first, then the padding, "
                     "in every row (right padding, as diffusers' encode_prompt writes it)")
  if lengths.min() < 1:
    raise ValueError(f"prompt_attention_mask has rows without any real token: "
                     f"{np.flatnonzero(lengths == 0).tolist()}")
  return mask


class HunyuanVideoPipeline:
  """Text-to-video latents with a HunyuanVideo checkpoint: precomputed prompt
  embeddings -> joint-attention DiT scan with embedded guidance."""

  def __init__(self, *, transformer_config, transformer_params, scheduler_config: dict,
               vae_scaling_factor: Optional[float] = None, name: str = "hunyuan_video",
               mesh=None):
    self.config = transformer_config
    self.mesh = mesh
    self.transformer_params = sharding_lib.resolve(mesh).place_params(transformer_params)
    self.scheduler_config = dict(scheduler_config)
    self.vae_scaling_factor = vae_scaling_factor
    self.name = name
    self._samplers = denoise.SamplerCache()

  @classmethod
  def from_pretrained(cls, folder, *, dtype: Optional[str] = None,
                      mesh=None) -> "HunyuanVideoPipeline":
    """Loads the transformer and the scheduler config of a diffusers HunyuanVideo folder.

    dtype: parameter and compute dtype of the transformer, "bfloat16" or "float32";
    default bfloat16 on accelerators, float32 on CPU.
    mesh: the denoiser's default mesh (see `modjax.sharding`); params are placed once.
    """
    folder = folders.pipeline_folder(folder, "HunyuanVideo")
    folders.check_model_index(folder, PIPELINE_CLASS, required=REQUIRED, optional=NOT_PORTED)
    dtype = folders.resolve_dtype(dtype)
    config, params = hunyuan.load_diffusers_transformer(folder / "transformer",
                                                        param_dtype=dtype, dtype=dtype)
    if config.in_channels != config.out_channels:
      raise ValueError(f"{str(folder)!r}: an image-to-video transformer (in_channels="
                       f"{config.in_channels}, out_channels={config.out_channels}); this "
                       f"pipeline is text-to-video")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    schedulers.hunyuan_video_scheduler(scheduler_config, 1)  # validate now
    return cls(transformer_config=config, transformer_params=params,
               scheduler_config=scheduler_config,
               vae_scaling_factor=_vae_scaling_factor(folder), name=folder.name, mesh=mesh)

  # ------------------------------------------------------------------ sizes

  def latent_size(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """(latent frames, height, width); ValueError naming the argument for sizes refused."""
    latent = arguments.video_size(height, width, num_frames, spatial=VAE_SPATIAL,
                                  temporal=VAE_TEMPORAL, patch=self.config.patch_size)
    try:
      self.config.grid(*latent)
    except ValueError as e:
      raise ValueError(f"num_frames={num_frames}: {e}") from None
    return latent

  def memory_estimate(self, *, height: int, width: int, num_frames: int, batch: int = 1,
                      text_len: int = 256,
                      attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig()
                      ) -> memory.MemoryEstimate:
    """Device memory of one call at these sizes (see modjax.memory); text_len: the real
    prompt tokens (the padding is dropped before denoising)."""
    cfg = self.config
    family = hunyuan.HunyuanVideoFamily(cfg, text_len=text_len)
    stages = {"denoise": estimates.denoise_stage_bytes(
        family, self.latent_size(height, width, num_frames), batch=batch, rows=batch,
        dim=cfg.dim, ffn_dim=cfg.mlp_dim, cross_text_len=0, attention=attention)}
    return memory.MemoryEstimate(weights={"transformer": memory.tree_bytes(self.transformer_params)},
                                 stages=stages)

  # -------------------------------------------------------------------- call

  def _contexts(self, prompt_embeds, prompt_attention_mask, pooled_prompt_embeds,
                guidance_scale: float):
    """[(batch rows, HunyuanVideoContext without padding)], one per real text length."""
    cfg = self.config
    text = arguments.embeddings("prompt_embeds", prompt_embeds, ndim=3, last=cfg.text_dim)
    pooled = arguments.embeddings("pooled_prompt_embeds", pooled_prompt_embeds, ndim=2,
                                  last=cfg.pooled_dim, batch=text.shape[0])
    mask = _text_mask(prompt_attention_mask, text.shape[:2])
    guidance = guidance_scale if cfg.guidance_embeds else None
    lengths = mask.sum(axis=1)
    groups = []
    for length in dict.fromkeys(int(n) for n in lengths):  # first-occurrence order
      rows = np.flatnonzero(lengths == length)
      context = hunyuan.HunyuanVideoContext.from_pipeline(
          text[rows], pooled[rows], mask[rows], guidance).trim_padding()
      context = context.replace(text=jnp.asarray(context.text, cfg.dtype),
                                pooled=jnp.asarray(context.pooled, cfg.dtype))
      groups.append((tuple(int(r) for r in rows), length, context))
    return groups

  def __call__(self, prompt=None, *, prompt_embeds=None, prompt_attention_mask=None,
               pooled_prompt_embeds=None, height: int = 720, width: int = 1280,
               num_frames: int = 129, num_inference_steps: int = 50,
               guidance_scale: float = 6.0, true_cfg_scale: float = 1.0,
               attention: cfg_lib.AttentionConfig = cfg_lib.DenseConfig(), seed: int = 0,
               latents=None, flow_shift: Optional[float] = None,
               callbacks: Sequence[Callable[[int, int], None]] = (),
               log: Optional[Callable[[str], None]] = None, check_memory: bool = True,
               mesh=None) -> HunyuanVideoOutput:
    """Sample video latents for precomputed prompt embeddings. Sizes in pixels and
    frames, as diffusers.

    prompt: must be None (the text encoders are not ported; see the module docstring).
    prompt_embeds [B, L, text_dim], prompt_attention_mask [B, L] (1 real, 0 padding,
      real tokens first), pooled_prompt_embeds [B, pooled_dim]: numpy, jax or torch.
    height, width: multiples of 8 x patch_size (16); num_frames: 4k+1.
    guidance_scale: the embedded guidance (the model sees guidance_scale * 1000).
    true_cfg_scale: only 1.0 (classifier-free guidance is not supported).
    attention: any modjax attention config (DenseConfig, MODConfig, baselines).
    latents: optional initial noise float32 [B, C, F, H/8, W/8] (else from seed).
    flow_shift: the scheduler's shift; None takes the folder's scheduler config.
    callbacks: host fn(step, num_steps) after each denoising step (progress bars).
    log: called with one line per stage (its time included), e.g. print.
    check_memory: refuse before compiling when the estimate exceeds the device's memory.
    mesh: run the denoising loop over a mesh (see `modjax.sharding`); None: the
      pipeline's mesh, else one device.
    """
    mesh = self.mesh if mesh is None else mesh
    if prompt is not None:
      raise ValueError(f"prompt: {NO_TEXT_ENCODERS}")
    for name, value in (("prompt_embeds", prompt_embeds),
                        ("prompt_attention_mask", prompt_attention_mask),
                        ("pooled_prompt_embeds", pooled_prompt_embeds)):
      if value is None:
        raise ValueError(f"{name} is required: {NO_TEXT_ENCODERS}")
    latent = self.latent_size(height, width, num_frames)
    arguments.positive_int("num_inference_steps", num_inference_steps)
    guidance_scale = arguments.positive_float("guidance_scale", guidance_scale)
    if true_cfg_scale != 1.0:
      raise ValueError(f"true_cfg_scale must be 1.0 (classifier-free guidance with negative "
                       f"embeddings is not supported), got {true_cfg_scale!r}")
    seed = arguments.seed(seed)
    groups = self._contexts(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds,
                            guidance_scale)
    batch = sum(len(rows) for rows, _, _ in groups)
    shape = (batch, self.config.in_channels, *latent)
    noise = arguments.latents(latents, shape)
    overrides = {} if flow_shift is None else {
        "flow_shift": arguments.positive_float("flow_shift", flow_shift)}
    scheduler = schedulers.hunyuan_video_scheduler(self.scheduler_config, num_inference_steps,
                                                   **overrides)
    settings = sampler_lib.SamplerSettings(
        frames=latent[0], height=latent[1], width=latent[2],
        num_inference_steps=num_inference_steps, guidance_scale=1.0, attention=attention,
        scheduler=scheduler)
    if check_memory:
      estimates.check(self.memory_estimate(height=height, width=width, num_frames=num_frames,
                                           batch=batch, text_len=max(n for _, n, _ in groups),
                                           attention=attention),
                      f"{num_frames}x{height}x{width} ({batch} video(s))", mesh)
    noise = denoise.initial_noise(seed, shape) if noise is None else jnp.asarray(noise)
    key = denoise.run_key(seed)

    stages = Stages(log)
    z = np.zeros(shape, np.float32)
    runs, weighted = [], 0.0
    for rows, length, context in groups:
      family = hunyuan.HunyuanVideoFamily(self.config, text_len=length)
      out, sparsity = denoise.denoise(
          self._samplers, family, settings, self.transformer_params, context, context, key,
          noise[np.asarray(rows)], stages=stages, callbacks=callbacks, mesh=mesh,
          describe=f"{len(rows)} prompt(s) of {length} text tokens, flow_shift {scheduler.shift}")
      z[np.asarray(rows)] = np.asarray(jax.device_get(out.latents))
      runs.append(out)
      weighted += sparsity * len(rows)
    stages.say(f"latents {tuple(z.shape)} (no HunyuanVideo VAE in modjax: no frames)")
    return HunyuanVideoOutput(
        latents=z, sparsity=weighted / batch, timings=stages.timings, sampling=tuple(runs),
        text_lengths=tuple(n for _, n, _ in groups), rows=tuple(r for r, _, _ in groups),
        flow_shift=float(scheduler.shift), vae_scaling_factor=self.vae_scaling_factor)
