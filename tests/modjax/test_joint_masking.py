"""Token-type-aware masking (docs/algorithm.md section 10): in a sequence of text and
video tokens, text rows and columns are always computed and MOD-DiT measures, fits,
predicts and remembers the video-video blocks only.

The authors' rule, as their code states it (MoD/mod/attn_mask.py with the video offset of
triton_flash_sparsity.py), for a video region that starts and ends on the block grid:

  * the sparsity map is [B, H, n_video, n_video], the video-video blocks of the full map;
  * the fit, the prediction and the history use that map only;
  * the attention mask over the whole sequence is all True, except its video-video
    sub-block, which is the predicted MOD mask;
  * they require the video token count to be a multiple of the block size.

We also take video regions off the block grid: a block where text and video meet is a
text block (its row and column always computed), so attention stays exact.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import modjax
import pallas_kernels
from modjax import features, policies, predict
from modjax.control import AttentionControl
from modjax.schedule import StepKind

B, L, H = 2, 2, 2


def _geometry(seq_len, video_start, video_tokens, block=64, tokens_per_frame=128):
  return policies.Geometry(num_layers=L, batch=B, heads=H, seq_len=seq_len,
                           tokens_per_frame=tokens_per_frame, block_size=block,
                           video_start=video_start, video_tokens=video_tokens)


@pytest.mark.parametrize("case, start, tokens, seq, blocks", [
    ("text_first_aligned", 128, 640, 768, (2, 12)),      # CogVideoX-like, on the grid
    ("video_first_aligned", 0, 640, 768, (0, 10)),       # HunyuanVideo-like
    ("text_first_off_grid", 80, 688, 768, (2, 12)),      # block 1 holds text and video
    ("video_first_off_grid", 0, 600, 680, (0, 9)),       # block 9 holds video and text
    ("all_video", 0, 660, 660, (0, 11)),                 # Wan: a short last block is video
])
def test_video_blocks_and_kernel_mask(case, start, tokens, seq, blocks):
  geom = _geometry(seq, start, tokens)
  assert geom.video_blocks == blocks
  v0, v1 = blocks
  n, total = v1 - v0, geom.total_blocks
  assert geom.num_blocks == n and geom.joint == (blocks != (0, total))
  video = np.random.default_rng(0).random((B, H, n, n)) < 0.3
  full = np.asarray(geom.kernel_mask(jnp.asarray(video)))
  assert full.shape == (B, H, total, total)
  np.testing.assert_array_equal(full[..., v0:v1, v0:v1], video)
  text = np.ones(total, bool)
  text[v0:v1] = False
  assert full[..., text, :].all() and full[..., :, text].all()  # text rows and columns
  np.testing.assert_array_equal(np.asarray(geom.video_part(jnp.asarray(full))), video)


def test_a_video_region_with_no_whole_block_is_refused_for_sparse_policies():
  geom = _geometry(160, 80, 40)
  policies.DensePolicy(modjax.DenseConfig(), geom)  # dense needs no block
  with pytest.raises(ValueError, match="fill no whole block"):
    policies.MODPolicy(modjax.MODConfig(block_size=64), geom)


def _fake_map(geom, seed):
  """A full-sequence sparsity map whose text blocks hold NaN: anything that reads them
  (fit, history, prediction) turns NaN and fails the test."""
  rng = np.random.default_rng(seed)
  total = geom.total_blocks
  smap = rng.random(geom.lead + (total, total)).astype(np.float32)
  v0, v1 = geom.video_blocks
  text = np.ones(total, bool)
  text[v0:v1] = False
  smap[..., text, :] = np.nan
  smap[..., :, text] = np.nan
  return jnp.asarray(smap)


@pytest.mark.parametrize("start, tokens, seq", [(128, 640, 768), (0, 600, 680), (80, 688, 768)],
                         ids=["text_first", "video_first_off_grid", "text_first_off_grid"])
def test_mod_state_machine_sees_video_blocks_only(start, tokens, seq):
  """Through MODPolicy.update (map, map, refresh): the history, the fit and the mask equal
  the authors' rule applied to the video-video blocks; the kernel table computes every
  text row and column."""
  geom = _geometry(seq, start, tokens)
  config = modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=3,
                            implementation="xla")
  policy = policies.MODPolicy(config, geom)
  bpf = geom.blocks_per_frame
  state = policy.init()
  maps = [_fake_map(geom, s) for s in range(3)]
  state = policy.update(state, {"sparsity_map": maps[0]}, StepKind.MAP)
  state = policy.update(state, {"sparsity_map": maps[1]}, StepKind.MAP)
  first_mask = state.mask
  state = policy.update(state, {"sparsity_map": maps[2]}, StepKind.REFRESH)

  # The rule, restated: on video blocks only, in the history's precision.
  dtype = policy.history_dtype
  video = [geom.video_part(m).astype(dtype) for m in maps]
  x0 = features.fit_pattern_features(video[0], bpf, config.ridge)
  x1 = features.fit_pattern_features(video[1], bpf, config.ridge)
  diag = predict.block_diagonal_mode(x1, config.e_max)
  mask1 = predict.predict_mask(x0, x1, interval=2, top_k=3, blocks_per_frame=bpf,
                               block_diagonal=diag)
  history = jnp.where(mask1, video[2], video[1])
  x2 = features.fit_pattern_features(history, bpf, config.ridge)
  mask2 = predict.predict_mask(x1, x2, interval=2, top_k=3, blocks_per_frame=bpf,
                               block_diagonal=diag)
  chex.assert_trees_all_equal(first_mask, mask1)
  chex.assert_trees_all_equal(state.prev_map, history)
  chex.assert_trees_all_close(state.x_cur, x2, atol=1e-6)
  chex.assert_trees_all_equal(state.mask, mask2)
  assert np.isfinite(np.asarray(state.prev_map, np.float32)).all()
  full = np.asarray(pallas_kernels.block_mask_from_table(
      jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:]), state.table), geom.total_blocks))
  np.testing.assert_array_equal(full.reshape(geom.lead + full.shape[-2:]),
                                np.asarray(geom.kernel_mask(mask2)))


@pytest.mark.parametrize("text_len", [64, 52], ids=["on_grid", "off_grid"])
def test_text_rows_attend_exactly_under_a_sparse_video_mask(text_len):
  """The kernel call a joint layout makes: text query rows get dense attention (every
  column, text and video), video rows attend to every text column."""
  rng = np.random.default_rng(1)
  seq, block = text_len + 320, 64
  geom = _geometry(seq, text_len, 320, block=block)
  q, k, v = (jnp.asarray(rng.standard_normal((1, seq, 2, 16)), jnp.float32) for _ in range(3))
  n = geom.num_blocks
  video = jnp.eye(n, dtype=bool)[None, None].repeat(2, axis=1)  # the sparsest video mask
  control = AttentionControl(mode="sparse", block_mask=geom.kernel_mask(video)[:, :],
                             block_size=block, sparse_implementation="xla")
  out, _ = control.self_attention(q, k, v)
  dense = jax.nn.dot_product_attention(q, k, v)
  v0, _ = geom.video_blocks
  text_rows = v0 * block  # every row of the text blocks (text and the mixed block)
  np.testing.assert_allclose(out[:, :text_rows], dense[:, :text_rows], atol=2e-5, rtol=2e-5)
  assert not np.allclose(out[:, text_rows:], dense[:, text_rows:], atol=1e-3)  # video is sparse
  # Video rows see every text key: a text-only perturbation of keys changes them.
  k2 = k.at[:, :text_len].multiply(3.0)
  out2, _ = control.self_attention(q, k2, v)
  assert not np.allclose(out2[:, text_rows:], out[:, text_rows:], atol=1e-4)


def _cogvideox(text_len):
  from models import cogvideox
  config = cogvideox.CogVideoXConfig.tiny()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        cogvideox.param_shapes(config))
  return cogvideox.CogVideoXFamily(config, text_len=text_len), params


@pytest.mark.parametrize("text_len", [64, 40], ids=["on_grid", "off_grid"])
def test_cogvideox_mod_runs_sparse_and_keeping_every_line_is_dense(text_len):
  """The sampler with MOD-DiT on CogVideoX's [text; video] sequence: sparse on video
  blocks, and exactly dense when the mask keeps every video block."""
  family, params = _cogvideox(text_len)
  frames, height, width = 5, 32, 32   # 5 x 16 x 16 = 1280 video tokens, 20 blocks of 64
  rng = np.random.default_rng(3)
  ctx = jnp.asarray(rng.standard_normal((1, text_len, family.config.text_dim)), jnp.float32)
  neg = jnp.asarray(rng.standard_normal((1, text_len, family.config.text_dim)), jnp.float32)

  def run(attention):
    settings = modjax.SamplerSettings(frames=frames, height=height, width=width,
                                      num_inference_steps=5, guidance_scale=3.0,
                                      attention=attention)
    return jax.jit(modjax.sample_fn(family, settings))(params, ctx, neg, jax.random.key(0))

  common = dict(block_size=64, warmup_steps=2, interval=2, refresh="sparse",
                implementation="xla")
  dense = run(modjax.DenseConfig())
  sparse = run(modjax.MODConfig(top_k=3, **common))
  assert 0.2 < modjax.sparsity(sparse) < 1.0
  assert sparse.state.mask.shape[-1] == 20  # the video blocks, not the whole sequence
  with pytest.warns(UserWarning, match="keeps all"):
    full = run(modjax.MODConfig(top_k=1.0, **common))
  assert modjax.sparsity(full) == 0.0
  np.testing.assert_allclose(full.latents, dense.latents, atol=2e-4, rtol=2e-4)
