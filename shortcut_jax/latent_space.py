"""Where a run's model works: on pixels, or on the scaled latents of a VAE (config.vae).

`config.data.image_size` and `config.data.channels` always describe the *pixel* images: what the
data holds, what grids show and what FID scores. With `config.vae.path` set, the denoiser sees
(image_size / f, image_size / f, latent_channels) latents instead, f = vae.downsample_factor:

  * precomputed: `config.data.latent_dir` (from `python -m shortcut_jax.tools.encode_latents`)
    feeds scaled latents straight to the train step;
  * online: the image source feeds pixels and `online_encode_step` encodes them inside the jitted
    train step (as the paper's code does).

Samples are latents; `PixelDecoder` decodes them on the mesh and clips to [-1, 1] only after
decoding (never in latent space). Each side holds only its half of the VAE: the train step the
encoder (`Vae.encoder_params`, see `online_encode_step`), sampling and evaluation the decoder
(`Vae.decoder_params`, see `pixel_fn` and `PixelDecoder`).

The guidance policy (`guidance_scale`) lives here too because it is a per-step-count decision
shared by grids, the sample CLI and every evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

GUIDANCE_POLICIES = ("auto", "all", "finest")


def uses_vae(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's model works in the latent space of a VAE (config.vae.path is set)."""
    vae_config = config.get("vae")
    return bool(vae_config is not None and vae_config.get("path"))


def is_online(config: ml_collections.ConfigDict) -> bool:
    """Whether images are encoded inside the train step (a VAE and no precomputed latents)."""
    return uses_vae(config) and not config.data.get("latent_dir")


def pixel_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the run's images (what grids show and metrics score)."""
    size = int(config.data.image_size)
    return (size, size, int(config.data.channels))


def model_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example as the denoiser sees it: pixels, latents, or (D,) toy points."""
    if config.data.get("name") == "toy2d":
        return (int(config.data.get("dim", 2)),)
    if not uses_vae(config):
        return pixel_shape(config)
    side = int(config.data.image_size) // int(config.vae.downsample_factor)
    return (side, side, int(config.vae.latent_channels))


def guidance_scale(
    config: ml_collections.ConfigDict, num_steps: int, cfg_scale: float | None = None
) -> float:
    """The guidance scale used when sampling with `num_steps` steps.

    config.sample_guidance:
      'all': `cfg_scale` at every step count.
      'finest': `cfg_scale` only at num_steps == denoise_timesteps (the flow-matching level);
        coarser budgets sample without guidance. With bootstrap_cfg the coarse step sizes were
        trained on guided targets already, so guiding them again would square the scale (1.5 ->
        ~2.25); this is how the paper's code evaluates.
      'auto': 'finest' when config.bootstrap_cfg is on, else 'all'.

    Args:
      config: the run config.
      num_steps: the sampling budget.
      cfg_scale: the scale to apply (default config.sample_cfg_scale).

    Returns:
      The scale (1.0 = no guidance).
    """
    scale = float(config.sample_cfg_scale if cfg_scale is None else cfg_scale)
    policy = config.get("sample_guidance", "auto")
    if policy == "auto":
        policy = "finest" if config.get("bootstrap_cfg") else "all"
    if policy == "finest" and int(num_steps) != int(config.denoise_timesteps):
        return 1.0
    return scale


def load_run_vae(config: ml_collections.ConfigDict) -> Any:
    """Loads config.vae.path and checks it against the config (and the latent dir, if any).

    Returns:
      A `shortcut_jax.models.vae.Vae`.

    Raises:
      ValueError: the weights do not fit config.vae.latent_channels / downsample_factor /
        data.channels, or data.latent_dir was encoded with other VAE weights.
    """
    from shortcut_jax.models import vae as vae_lib

    vae = vae_lib.load_vae(
        config.vae.path,
        scaling_factor=float(config.vae.scaling_factor),
        dtype=config.vae.get("dtype", "float32"),
    )
    problems = []
    if vae.arch.latent_channels != int(config.vae.latent_channels):
        problems.append(
            f"config.vae.latent_channels = {config.vae.latent_channels} but {config.vae.path} "
            f"has {vae.arch.latent_channels} latent channels"
        )
    if vae.arch.downsample_factor != int(config.vae.downsample_factor):
        problems.append(
            f"config.vae.downsample_factor = {config.vae.downsample_factor} but {config.vae.path} "
            f"downsamples by {vae.arch.downsample_factor}"
        )
    if vae.arch.in_channels != int(config.data.channels):
        problems.append(
            f"config.data.channels = {config.data.channels} but {config.vae.path} encodes "
            f"{vae.arch.in_channels}-channel images"
        )
    latent_dir = config.data.get("latent_dir")
    if latent_dir:
        from shortcut_jax.data import latents as latents_lib

        encoded_with = latents_lib.read_metadata(latent_dir).get("vae", {}).get("checksum")
        if encoded_with != vae.checksum:
            problems.append(
                f"config.data.latent_dir = {latent_dir} was encoded with other VAE weights "
                f"(checksum {str(encoded_with)[:12]}...) than config.vae.path = "
                f"{config.vae.path} ({vae.checksum[:12]}...): samples would decode wrongly. "
                "Use the VAE the latents were made with, or encode them again with this one"
            )
    if problems:
        raise ValueError("The VAE does not fit this run:\n  " + "\n  ".join(problems))
    return vae


def online_encode_step(
    config: ml_collections.ConfigDict, train_step: Callable[..., Any], vae: Any
) -> Callable[..., Any]:
    """Wraps `train_step(state, batch)` as `step(state, batch, vae_params)` encoding batch['image'].

    The images are encoded to scaled latents inside the same jitted program (posterior samples
    drawn from fold_in(seed, step) when config.vae.sample_posterior, else posterior means), in
    the compute dtype of `vae` (config.vae.dtype). `vae_params` need only be the encoder half,
    `vae.encoder_params` (`compiled_step.build` passes nothing else); `vae` gives the arch, the
    scaling factor and the dtype.
    """
    from shortcut_jax.models import vae as vae_lib

    sample = bool(config.vae.sample_posterior)
    base_rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x5AE)

    def step(state: Any, batch: dict[str, jax.Array], vae_params: Any) -> Any:
        rng = jax.random.fold_in(base_rng, state.step) if sample else None
        latents = vae_lib.encode(
            vae.arch,
            vae_params,
            batch["image"],
            rng,
            scaling_factor=vae.scaling_factor,
            dtype=vae.dtype,
        )
        return train_step(state, {**batch, "image": jax.lax.stop_gradient(latents)})

    return step


PixelFn = Callable[[Any, jax.Array], jax.Array]


def clip_pixels(params: Any, samples: jax.Array) -> jax.Array:
    """Pixel-space samples as images: clipped to [-1, 1] (toy points pass through). Pure."""
    del params
    if samples.ndim < 4:
        return samples
    return jnp.clip(samples, -1.0, 1.0).astype(jnp.float32)


def _vae_pixels(
    arch: Any, scaling_factor: float, dtype: str, params: Any, latents: jax.Array
) -> jax.Array:
    """Scaled latents decoded by the VAE, then clipped to [-1, 1]. Pure."""
    from shortcut_jax.models import vae as vae_lib

    images = vae_lib.decode(arch, params, latents, scaling_factor=scaling_factor, dtype=dtype)
    return jnp.clip(images, -1.0, 1.0).astype(jnp.float32)


def pixel_fn(vae: Any | None) -> PixelFn:
    """The pure ``pixels(params, samples) -> images`` of a run: the VAE decode and clip, or only
    the clip in pixel space (`vae` None). Equal VAEs give equal (hashable) functions.

    With a VAE, `params` need only be its decoder half (`vae.decoder_params`, what
    `PixelDecoder.device_fn` returns); the decode runs in the compute dtype of `vae`.
    """
    if vae is None:
        return clip_pixels
    return functools.partial(_vae_pixels, vae.arch, float(vae.scaling_factor), vae.dtype)


class PixelDecoder:
    """Turns samples into pixel images in [-1, 1]: VAE decode (on the mesh) when the run has one.

    In pixel space it only clips. In latent space the latents are decoded in chunks of
    `batch_size`, split over the mesh's batch axes when a mesh is given (every process must call
    it together then), and clipped after decoding. `device_fn` gives the same decode and clip as
    a pure function for programs that decode on the device (the fused evaluation); both use one
    copy of the VAE's decoder half (`Vae.decoder_params`) on the devices; the encoder is never
    placed there.
    """

    def __init__(
        self,
        vae: Any | None,
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int = 64,
    ):
        self.vae = vae
        self.mesh = mesh
        self.batch_size = max(int(batch_size), 1)
        self._pixels: PixelFn = clip_pixels
        self._pixel_params: Any = None
        self._decode = None
        if vae is not None:
            from shortcut_jax import sharding

            self._pixels = pixel_fn(vae)
            if mesh is None:
                self._pixel_params = jax.device_put(vae.decoder_params)
                self._decode = jax.jit(self._pixels)
            else:
                replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
                self._pixel_params = jax.device_put(vae.decoder_params, replicated)
                self._decode = jax.jit(
                    self._pixels, in_shardings=(replicated, batch), out_shardings=batch
                )

    def device_fn(self) -> tuple[PixelFn, Any]:
        """(pixels, params): this decoder as a pure ``pixels(params, samples) -> images``.

        `pixels` keeps its identity for the decoder's life, so programs built from it compile
        once; `params` are the VAE decoder half's weights on the devices (replicated over the
        mesh), None in pixel space. Images are (B, H, W, C) float32 clipped to [-1, 1].
        """
        return self._pixels, self._pixel_params

    @classmethod
    def for_config(
        cls,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int | None = None,
    ) -> PixelDecoder:
        """The decoder of a run: loads config.vae.path when set (see `load_run_vae`)."""
        vae = load_run_vae(config) if uses_vae(config) else None
        size = int(config.get("eval_batch_size", 64)) if batch_size is None else batch_size
        return cls(vae, mesh, size)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """(N, h, w, c) samples -> (N, H, W, C) float32 pixels clipped to [-1, 1]."""
        samples = np.asarray(samples)
        if samples.ndim < 4:  # toy points: nothing to decode or clip
            return samples
        if self._decode is None:
            return np.clip(samples, -1.0, 1.0).astype(np.float32)
        from shortcut_jax import sharding

        chunk = sharding.round_up_to_shards(self.batch_size, self.mesh)
        outputs = []
        for start in range(0, len(samples), chunk):
            part = samples[start : start + chunk].astype(np.float32)
            valid = len(part)
            if valid < chunk:  # pad so every chunk reuses one compiled program
                part = np.concatenate(
                    [part, np.zeros((chunk - valid, *part.shape[1:]), part.dtype)]
                )
            if self.mesh is None:
                images = np.asarray(self._decode(self._pixel_params, part))
            else:
                part = sharding.shard_batch(self.mesh, part)
                images = sharding.gather(self._decode(self._pixel_params, part))
            outputs.append(images[:valid])
        return np.concatenate(outputs, axis=0)
