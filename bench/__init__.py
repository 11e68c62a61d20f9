"""Side-by-side benchmark of each recipe against a plain transformers + PEFT + bitsandbytes script."""
