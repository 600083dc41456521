"""The engine: model runner, sampler, detokeniser, scheduler and the instance loops."""
