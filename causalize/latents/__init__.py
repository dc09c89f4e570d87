"""The latent path: VAEs read and run as their pipelines do, pixel episodes encoded to latent
episodes, actions grouped onto latent frames, and decoding that streams.

Inference-side (rollout and the environment use it); training imports it, never the reverse."""
