"""MOD-DiT in JAX: pattern-mixture prediction of block-sparse attention masks,
carried as explicit state through a one-compile `lax.scan` sampler.

Public API:
  fit_pattern_features, PatternFeatures, predict_mask: docs/algorithm.md sections 2-3.
  MODConfig, DenseConfig, StaticWindowConfig, OracleConfig, warmup_reuse: policies.
  Sampler, SamplerSettings, sample_fn, SampleOutput, sparsity: the sampler.
  AttentionControl: what a step asks of attention. callbacks: progress and timers.
  FlowEuler, FlowUniPC, from_diffusers_config: schedulers as scan steppers.
  WanPipeline: prompt -> video from a diffusers Wan2.1 folder (text encoder, DiT, VAE).
  CogVideoXPipeline: prompt -> latents from a diffusers CogVideoX folder (T5, DiT; no VAE).
  HunyuanVideoPipeline: precomputed prompt embeddings -> latents from a diffusers
    HunyuanVideo folder (DiT with embedded guidance; no text encoders, no VAE).
"""

from modjax.config import (
    DenseConfig,
    MODConfig,
    OracleConfig,
    StaticMaskConfig,
    StaticWindowConfig,
    warmup_reuse,
)
from modjax.control import AttentionControl
from modjax.features import PatternFeatures, fit_pattern_features, reconstruct_map
from modjax.policies import Geometry, MODState
from modjax.pipelines import CogVideoXPipeline, HunyuanVideoPipeline, WanPipeline
from modjax.predict import max_row_width, predict_mask
from modjax.sampler import SampleOutput, Sampler, SamplerSettings, sample_fn, sparsity
from modjax.schedule import StepKind, flow_sigmas, mod_step_kinds
from modjax.schedulers import FlowEuler, FlowUniPC, from_diffusers_config

__all__ = [
    "AttentionControl", "CogVideoXPipeline", "HunyuanVideoPipeline", "WanPipeline",
    "DenseConfig", "FlowEuler", "FlowUniPC", "Geometry", "MODConfig",
    "MODState", "OracleConfig", "PatternFeatures",
    "SampleOutput", "Sampler", "SamplerSettings", "StaticMaskConfig", "StaticWindowConfig", "StepKind",
    "fit_pattern_features", "flow_sigmas", "from_diffusers_config", "max_row_width", "mod_step_kinds",
    "predict_mask", "reconstruct_map", "sample_fn", "sparsity", "warmup_reuse",
]
