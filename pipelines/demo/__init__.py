"""Demo-only code, kept apart from the pipeline: the generated corpus and its server, the tiny CLIP fitted in
place of pretrained weights, the colour task's metric, and `run_demo`, which prepares those and then runs the
ordinary pipeline on `pipelines/configs/demo.toml`."""
