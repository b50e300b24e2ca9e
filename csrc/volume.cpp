// placeholder: replaced by the volume engine
