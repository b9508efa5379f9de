"""Language-model backbones (encoder-decoder and decoder-only) and their offline weights."""
