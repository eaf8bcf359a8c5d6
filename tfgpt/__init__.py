"""tfgpt: a miniature GPT in pure TensorFlow."""

__version__ = "0.1.0"
