"""The data: corpora, standardization and vocabulary, the token store, windows and tf.data."""
