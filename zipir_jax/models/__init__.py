"""Networks of ZipIR: LP-VAE (§3.1), pixel-aware decoder, SD-VAE baseline, discriminator, LPIPS."""
