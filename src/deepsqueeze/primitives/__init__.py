"""Pure tensor math with no nn.Module knowledge (quantizers, k-means, masks, factorizations, bit packing)."""
