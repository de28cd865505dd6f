"""Training loops: the judge, the teacher (latent diffusion) and the editor GAN."""
