"""Masked-diffusion LMs (DAT spec §5): objectives (training loss, Monte-Carlo likelihood), the
scanned denoising sampler, and the inpainting driver of DAT Stage A (spec §2.2)."""
