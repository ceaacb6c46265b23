"""What a spec may ask of a model (`ModelLimits`, with `PostprocessLimits`) and what it
gets where it asks nothing (`RenderDefaults`). Each model family states its own
(`farm.families`); a model's config may override them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class PostprocessLimits(_Limits):
    """What a spec's `postprocess` may ask of a model's renders."""

    max_interpolation_factor: int = Field(8, ge=2, le=16)
    """Largest frame interpolation factor (the smallest is 2)."""
    max_output_fps: int = Field(120, ge=1)
    """Highest frame rate after interpolation (by factor or target_fps)."""
    max_upscale_factor: int = Field(4, ge=2, le=8)
    """Largest upscale factor (the smallest is 2)."""
    max_output_pixels: int = Field(3840 * 2160, ge=1)
    """Largest output frame after upscaling, width x height."""
    max_output_frames: int = Field(2049, ge=1)
    """Most frames after interpolation."""
    max_candidates: int = Field(8, ge=1, le=64)
    """Most candidates (seeds rendered and scored, the best kept) one render may ask for."""


class ModelLimits(_Limits):
    size_multiple: int = Field(32, ge=1)
    """Width and height must be multiples of this (VAE compression times patch size)."""
    min_size: int = Field(32, ge=1)
    """Smallest width or height."""
    max_width: int = Field(1280, ge=1)
    """Largest width in pixels."""
    max_height: int = Field(1280, ge=1)
    """Largest height in pixels."""
    frame_step: int = Field(8, ge=1)
    """Frame counts must be frame_step * k + 1 (the VAE's temporal compression)."""
    min_frames: int = Field(9, ge=1)
    """Fewest frames a render may ask for."""
    max_frames: int = Field(257, ge=1)
    """Most frames a render may ask for."""
    min_steps: int = Field(1, ge=1)
    """Fewest denoising steps (a family whose scheduler cannot denoise in fewer says so)."""
    max_steps: int = Field(200, ge=1)
    """Most denoising steps."""
    max_prompt_chars: int = Field(4000, ge=1)
    """Longest prompt or negative prompt in characters."""
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    """Largest conditioning image, encoded."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest conditioning image, decoded (width x height)."""
    max_fps: int = Field(60, ge=1)
    """Highest output frame rate."""
    max_guidance_scale: float = Field(30.0, ge=0)
    """Highest classifier-free guidance scale."""
    max_adapters: int = Field(4, ge=0, le=16)
    """Most LoRA adapters one render may apply (each adds its matrices to every adapted layer)."""
    postprocess: PostprocessLimits = Field(default_factory=PostprocessLimits)
    """Limits of post-processing (interpolation, upscaling, candidates)."""

    @model_validator(mode="after")
    def _check_steps(self) -> "ModelLimits":
        if self.min_steps > self.max_steps:
            raise ValueError(f"limits: min_steps {self.min_steps} > max_steps {self.max_steps}")
        return self


class RenderDefaults(_Limits):
    width: int = 768
    """Width used when a spec leaves it 0."""
    height: int = 512
    """Height used when a spec leaves it 0."""
    num_frames: int = 121
    """Frame count used when a spec leaves it 0."""
    fps: int = 24
    """Frame rate used when a spec leaves it 0."""
    num_inference_steps: int = 40
    """Denoising steps used when a spec leaves it 0."""
    guidance_scale: float = 3.0
    """Guidance scale used when a spec leaves it unset."""
