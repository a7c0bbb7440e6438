"""Stage entry points: python -m scripts.<stage> (or torchrun ... -m scripts.<stage>)."""
