"""Ray Tune sweeps over SFTMix training: search spaces (YAML) and the `sftmix-ray tune` entry."""
