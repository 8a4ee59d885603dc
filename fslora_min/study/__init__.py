"""The reproduction study of FSLoRA (arXiv 2501.19389, section 5): it imports the method from
fslora_min/ and is never imported by it, as nanoGPT's bench.py sits beside model.py."""
