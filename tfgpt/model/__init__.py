"""The model: the Transformer's layers, attention, the GPT and its loss."""
