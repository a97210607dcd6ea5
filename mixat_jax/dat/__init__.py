"""DAT Stage A: distributional sampling and selection of adversarial prompts (DAT spec §2.2, §2.5).

`sample_config.SampleConfig` is the run's config; `stage_a.run(cfg, workdir)` is the resumable,
data-parallel pipeline (draw plan -> inpainting -> target scoring + judge -> per-process shards
-> merge, selection and summary). The submodules are imported by name; this package file holds
no code.
"""
