"""The networks and their files: the judge, the teacher pipeline, the editor GAN."""
