"""State-dict adapters, one per external format: the original CompVis `.ckpt` layout and diffusers'
folder layout. Our modules already use the original key names, so the `.ckpt` adapter only adds
prefixes; the diffusers adapters rename."""
