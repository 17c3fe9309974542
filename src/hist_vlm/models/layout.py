"""The file names of a saved model folder (`save_pretrained`), shared by the backbones that
write it and the registry that recognises it."""

CONFIG_FILE = "config.json"        # {"backbone": NAME, "config": {...}}
WEIGHTS_FILE = "model.safetensors"
