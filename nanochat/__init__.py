"""nanochat: train a small ChatGPT-like model end to end. See README.md."""
