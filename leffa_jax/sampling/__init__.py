"""Sampling core: steppers (update rules by name), the denoising loop and guidance.

`steppers` holds the registry and the `Stepper` interface (`steppers_classic`: ddpm, ddim,
dpmpp_2m; `steppers_multistep`: unipc, deis, pndm).
"""
