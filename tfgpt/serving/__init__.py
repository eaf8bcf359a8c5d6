"""Generation and its uses: the cached decode, sampling, the SavedModel export, generate and evaluate."""
