"""The SD v1 model stack: UNet, VAE, CLIP text encoder and tokenizer, DDPM schedule, samplers and
checkpoint adapters. Nothing here knows about parallelism or the training loss."""
