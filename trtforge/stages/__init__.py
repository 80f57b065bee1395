"""The pipeline's stages, one module each, in pipeline order: export, validate, fp16, engines."""
