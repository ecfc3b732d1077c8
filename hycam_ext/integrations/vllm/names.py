"""The architecture names and the config key shared by the exporter and the vLLM model classes
(a module of its own, so that neither imports the package that lazily imports them)."""

# model_type -> (the base architecture in config.json, the HyCAM architecture vLLM serves)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "HyCAMLlamaForCausalLM"),
    "qwen2": ("Qwen2ForCausalLM", "HyCAMQwen2ForCausalLM"),
    "qwen3": ("Qwen3ForCausalLM", "HyCAMQwen3ForCausalLM"),
}

# the key of config.json that carries HyCAMConfig.to_dict()
CONFIG_KEY = "hycam_config"
