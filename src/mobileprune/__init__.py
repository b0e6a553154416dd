"""mobileprune: prune a CIFAR-10 MobileNetV2 for edge CPUs and grade it as the course lab does."""
__version__ = "0.1.0"
