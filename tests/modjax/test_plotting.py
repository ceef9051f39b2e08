import imageio.v2 as imageio
import jax
import pytest

from models import wan
import modjax

pytest.importorskip("matplotlib")
from modjax import plotting  # noqa: E402


def test_plots_of_a_mod_run_are_written(tmp_path):
  config = wan.WanConfig.tiny()
  params = wan.init_params(config, jax.random.key(0), 8, 16, 16, 8)
  ctx = jax.random.normal(jax.random.key(1), (1, 8, config.text_dim))
  settings = modjax.SamplerSettings(
      frames=8, height=16, width=16, num_inference_steps=6, guidance_scale=3.0,
      attention=modjax.MODConfig(block_size=64, warmup_steps=2, interval=2, top_k=4,
                                 implementation="xla"))
  out = modjax.Sampler(wan.WanFamily(config), settings)(params, ctx, ctx + 1, jax.random.key(2))
  for name, fig_fn in [("maps.png", lambda p: plotting.plot_maps(out.state, layer=1, path=p)),
                       ("density.png", lambda p: plotting.plot_density(out, path=p))]:
    path = tmp_path / name
    fig_fn(str(path))
    image = imageio.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100
    assert image.std() > 0
